"""`PreallocatedLayer`: the KV cache layer sampling uses holds what `DynamicLayer`'s concatenation holds, writes
into one buffer while it has room, and survives the cache operations `generate` may apply."""

import torch
from transformers.cache_utils import DynamicLayer

from pipeline.generation import PreallocatedLayer


def _steps(*widths: int, batch: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 2, w, 4, generator=generator), torch.randn(batch, 2, w, 4, generator=generator))
            for w in widths]  # fmt: skip


def _feed(layer, steps):
    for keys, values in steps:
        out = layer.update(keys, values)
    return out


def test_holds_the_concatenated_cache_in_one_buffer_while_it_has_room():
    steps = _steps(5, 1, 1, 1)
    layer, reference = PreallocatedLayer(capacity=8), DynamicLayer()
    buffers = []
    for keys, values in steps:
        got, expected = layer.update(keys, values), reference.update(keys, values)
        buffers.append(layer.key_buffer.data_ptr())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got[0].data_ptr() == layer.key_buffer.data_ptr()  # a view of the buffer, not a copy
    assert len(set(buffers)) == 1 and layer.key_buffer.shape[-2] == 8 and layer.get_seq_length() == 8


def test_outgrowing_the_capacity_doubles_the_buffer_and_keeps_the_prefix():
    steps = _steps(3, 1, 1, 1, 1)
    layer = PreallocatedLayer(capacity=4)
    keys, values = _feed(layer, steps)
    assert layer.key_buffer.shape[-2] == 8 and layer.get_seq_length() == 7
    torch.testing.assert_close(keys, torch.cat([k for k, _ in steps], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v for _, v in steps], dim=-2), rtol=0, atol=0)


def test_crop_and_batch_selection_continue_from_what_they_left():
    steps = _steps(4, 1, 1)
    layer, reference = PreallocatedLayer(capacity=16), DynamicLayer()
    _feed(layer, steps), _feed(reference, steps)
    for cache in (layer, reference):
        cache.crop(-2)
        cache.batch_select_indices(torch.tensor([2, 0]))
    (keys, values), = _steps(1, batch=2)  # fmt: skip
    got, expected = layer.update(keys, values), reference.update(keys, values)
    assert layer.get_seq_length() == 5 and got[0].shape == (2, 2, 5, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
