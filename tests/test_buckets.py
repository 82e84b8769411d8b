"""length_buckets: a partition of the rows into few groups that pads the fewest tokens."""

import itertools
import random

import pytest
import torch

from pretrain.padding import left_pad, length_buckets


def padded_cost(lengths, groups):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force_cost(lengths, max_buckets, call_cost=0):
    """Best cost over every way to cut the sorted lengths into at most max_buckets runs."""
    s = sorted(lengths)
    best = len(s) * s[-1] + call_cost
    for k in range(1, max_buckets):
        for cuts in itertools.combinations(range(1, len(s)), k):
            bounds = (0, *cuts, len(s))
            best = min(best, sum((b - a) * s[b - 1] for a, b in zip(bounds, bounds[1:])) + (k + 1) * call_cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_buckets_partition_rows_and_pad_the_fewest_tokens(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 9))]
    max_buckets = rng.randint(1, 4)
    call_cost = rng.choice([0, 3, 10])  # tokens charged per batch
    groups = length_buckets(lengths, max_buckets, call_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert 1 <= len(groups) <= max_buckets
    assert padded_cost(lengths, groups) + len(groups) * call_cost == brute_force_cost(lengths, max_buckets, call_cost)


def test_a_per_call_cost_keeps_a_few_rows_in_one_batch():
    assert len(length_buckets([2, 30], 4)) == 2  # 32 tokens in two calls, instead of 60 padded
    assert length_buckets([2, 30], 4, call_cost=128) == [[0, 1]]  # one call: the saved padding costs less than a call


def test_one_bucket_is_the_padded_batch_and_bad_counts_are_refused():
    assert length_buckets([3, 1, 2], 1) == [[1, 2, 0]]
    assert length_buckets([], 4) == []
    with pytest.raises(ValueError, match="max_buckets must be at least 1, got 0"):
        length_buckets([1], 0)


def test_left_pad_right_aligns_each_row_and_masks_the_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
