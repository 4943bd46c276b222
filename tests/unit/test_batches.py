import torch

from pipeline.data.batches import LengthGroupedBatchSampler, PromptCompletion, SFTCollator
from pipeline.models.logprobs import sequence_logps, token_logps
from pipeline.train.sft import completion_nll

PAD, EOS = 0, 9


def test_sft_collator_masks_prompt_and_pad_and_appends_one_eos():
    batch = SFTCollator(pad_id=PAD, eos_id=EOS)([PromptCompletion([5, 6], [7]), PromptCompletion([5], [7, 8, 3])])
    # row 0: prompt 5 6 | completion 7 | EOS | pad
    # row 1: prompt 5   | completion 7 8 3 | EOS
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS, PAD], [5, 7, 8, 3, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]


def test_token_logps_match_a_naive_loop():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    expected = torch.tensor([[torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for t in range(4)] for b in range(2)])
    torch.testing.assert_close(token_logps(logits, ids), expected)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(sequence_logps(logits, ids, mask), (expected * mask[:, 1:]).sum(-1))


def test_completion_nll_is_mean_over_target_tokens_only():
    torch.manual_seed(1)
    logits, ids = torch.randn(1, 4, 7), torch.tensor([[1, 2, 3, 4]])
    loss, n = completion_nll(token_logps(logits, ids), torch.tensor([[0, 0, 1, 1]]))
    steps = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(loss, -(steps[1, 3] + steps[2, 4]) / 2)
    assert n == 2


def test_length_grouped_batches_cover_every_row_once_and_group_lengths():
    lengths = [i % 17 + 1 for i in range(500)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=10, seed=0, window=5)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 4  # a random batch spans ~14 lengths
    assert list(sampler) != batches  # a new order each epoch


def test_accumulation_groups_split_one_large_batch_and_carry_its_weight():
    lengths = [i % 13 + 1 for i in range(96)]
    large = list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, window=4))
    micro = list(LengthGroupedBatchSampler(lengths, batch_size=4, seed=3, window=4, accumulate=2, weights=lengths))
    # the micro-batches, paired in order, are exactly the large batches; each carries its pair's total weight
    assert [[i for i, _ in a] + [i for i, _ in b] for a, b in zip(micro[::2], micro[1::2], strict=True)] == large
    totals = {i: total for batch in micro for i, total in batch}
    assert all(totals[i] == sum(lengths[j] for j in batch) for batch in large for i in batch)


def test_ranks_split_each_step_of_one_shared_order_and_resume_at_the_same_place():
    lengths = [i % 13 + 1 for i in range(40)]
    large = list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, window=2))  # one process, batch 8
    assert list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, window=2, rank=0, world_size=1)) == large
    ranks = [
        LengthGroupedBatchSampler(lengths, batch_size=2, seed=3, window=2, accumulate=2, rank=r, world_size=2)
        for r in (0, 1)
    ]
    batches = [list(sampler) for sampler in ranks]
    assert [len(b) for b in batches] == [len(sampler) for sampler in ranks] == [10, 10]  # as many steps each
    # a step (two micro-batches on each of two ranks) holds the rows of one large batch, each rank half of them
    for step, rows in enumerate(large):
        shares = [[i for b in rank[2 * step : 2 * step + 2] for i in b] for rank in batches]
        assert sorted(shares[0] + shares[1]) == sorted(rows) and len(shares[0]) == len(shares[1]) == 4
    # resumed after 4 micro-batches (two steps), each rank yields what it would have
    for sampler, full in zip(ranks, batches, strict=True):
        sampler.epoch, sampler.skip = 0, 4
        assert list(sampler) == full[4:]


def test_ranks_get_as_many_rows_the_order_padded_with_its_own_first_rows():
    ranks = [list(LengthGroupedBatchSampler([3] * 37, batch_size=4, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    rows = [i for rank in ranks for b in rank for i in b]
    assert [len(rank) for rank in ranks] == [5, 5] and len(rows) == 38 and set(rows) == set(range(37))


def test_tightest_packing_widens_rows_only_when_that_leaves_fewer_padding_slots():
    from pipeline.data.batches import tightest_packing

    # similar lengths: rows of the longest hold one each (6 x 10 = 60 slots for 51 tokens); twice as wide, two
    # each (3 x 18 = 54); four times, four and two (2 x 35 = 70)
    assert tightest_packing([10, 9, 8, 8, 8, 8]) == [[0, 1], [2, 3], [4, 5]]
    # a short tail fits beside the longest at its own width: no wider rows
    assert tightest_packing([10, 2, 3, 5]) == [[0], [3, 2, 1]]


def test_packed_batch_indexes_every_sequence_and_its_last_token():

    from pipeline.data.batches import packed_batch, per_sequence, response_batch

    batch = response_batch([[5, 6], [7], [8, 9, 10]], [[11], [12, 13], [14]], [True] * 3, eos_id=2, pad_id=0)
    packed = packed_batch(batch, capacity=8)
    flat = packed["input_ids"].flatten()
    assert flat[packed["last_token"]].tolist() == [2, 2, 2]  # every sequence ends with its EOS
    lengths = per_sequence(packed["token_mask"][:, 1:] * (packed["position_ids"][:, 1:] > 0), packed)
    assert lengths.tolist() == [3, 3, 4]  # tokens after each sequence's first, found through sequence_index
    assert per_sequence(packed["loss_mask"][:, 1:], packed).tolist() == batch["loss_mask"][:, 1:].sum(-1).tolist()
