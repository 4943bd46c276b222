"""`PreallocatedLayer`: the KV cache layer sampling uses holds what `DynamicLayer`'s concatenation holds, writes
into one buffer while it has room, grows in steps up to its limit, and survives the cache operations `generate` may
apply."""

import torch
from transformers.cache_utils import DynamicLayer

from pipeline.models.generation import CACHE_BUCKET, PreallocatedLayer


def _steps(*widths: int, batch: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 2, w, 4, generator=generator), torch.randn(batch, 2, w, 4, generator=generator))
        for w in widths
    ]


def _feed(layer, steps):
    for keys, values in steps:
        out = layer.update(keys, values)
    return out


def test_holds_the_concatenated_cache_in_one_buffer_while_it_has_room():
    steps = _steps(5, 1, 1, 1)
    layer, reference = PreallocatedLayer(max_length=8), DynamicLayer()
    buffers = []
    for keys, values in steps:
        got, expected = layer.update(keys, values), reference.update(keys, values)
        buffers.append(layer.key_buffer.data_ptr())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got[0].data_ptr() == layer.key_buffer.data_ptr()  # a view of the buffer, not a copy
    assert len(set(buffers)) == 1 and layer.key_buffer.shape[-2] == 8 and layer.get_seq_length() == 8


def test_grows_in_steps_up_to_the_limit_keeping_the_prefix():
    prompt, budget = 10, 150
    steps = _steps(prompt, *[1] * budget)
    layer, sizes = PreallocatedLayer(max_length=prompt + budget), []
    for keys, values in steps:
        layer.update(keys, values)
        sizes.append(layer.key_buffer.shape[-2])
    # room for CACHE_BUCKET more positions or half as many again, whichever is more; never past the limit
    assert list(dict.fromkeys(sizes)) == [prompt + CACHE_BUCKET, 75 + CACHE_BUCKET, prompt + budget]
    keys, values = layer.keys, layer.values
    torch.testing.assert_close(keys, torch.cat([k for k, _ in steps], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v for _, v in steps], dim=-2), rtol=0, atol=0)
    layer.update(*_steps(1)[0])  # past the limit (a caller that outgrew it): it still grows
    assert layer.get_seq_length() == prompt + budget + 1 and layer.key_buffer.shape[-2] == prompt + budget + 1


def test_crop_and_batch_selection_continue_from_what_they_left():
    steps = _steps(4, 1, 1)
    layer, reference = PreallocatedLayer(max_length=16), DynamicLayer()
    _feed(layer, steps), _feed(reference, steps)
    for cache in (layer, reference):
        cache.crop(-2)
        cache.batch_select_indices(torch.tensor([2, 0]))
    ((keys, values),) = _steps(1, batch=2)
    got, expected = layer.update(keys, values), reference.update(keys, values)
    assert layer.get_seq_length() == 5 and got[0].shape == (2, 2, 5, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
