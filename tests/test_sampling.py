"""K-repeat distributed sampling: group layout across ranks, reference-count buckets, resumability."""

from collections import Counter

import pytest

from identity_grpo.sampling import KRepeatSampler, shard_in_order

# 12 rows with 1 reference, 5 with 2, 3 with 3 (interleaved, as a real CSV would be).
REFERENCE_COUNTS = [1, 2, 1, 1, 3, 1, 2, 1, 1, 3, 1, 2, 1, 1, 2, 1, 3, 1, 2, 1]


def _global_batch(step, *, batch_size, group_size, num_replicas, reference_counts=REFERENCE_COUNTS, seed=0):
    """(row, group_id) of every sample of every rank for one step."""
    samples = []
    for rank in range(num_replicas):
        sampler = KRepeatSampler(
            reference_counts, batch_size=batch_size, group_size=group_size,
            num_replicas=num_replicas, rank=rank, seed=seed,
        )
        batch = sampler.batch(step)
        assert len(batch.indices) == len(batch.group_ids) == batch_size
        samples.extend(zip(batch.indices, batch.group_ids))
    return samples


@pytest.mark.parametrize(
    "batch_size, group_size, num_replicas",
    [(4, 4, 1), (6, 3, 2), (2, 4, 2), (3, 2, 4), (5, 5, 3), (4, 6, 3), (8, 2, 1), (16, 8, 2)],
)
def test_every_draw_appears_exactly_k_times_across_ranks(batch_size, group_size, num_replicas):
    groups_per_batch = batch_size * num_replicas // group_size
    for step in range(5):
        samples = _global_batch(step, batch_size=batch_size, group_size=group_size, num_replicas=num_replicas)
        group_sizes = Counter(group_id for _, group_id in samples)
        assert sorted(group_sizes) == list(range(step * groups_per_batch, (step + 1) * groups_per_batch))
        assert set(group_sizes.values()) == {group_size}
        # One row per group id, and every row appears K times per draw of it.
        row_of_group = {}
        for row, group_id in samples:
            assert row_of_group.setdefault(group_id, row) == row
        draws_of_row = Counter(row_of_group.values())
        assert Counter(row for row, _ in samples) == {row: group_size * n for row, n in draws_of_row.items()}


def test_rows_are_drawn_without_replacement_when_the_bucket_is_large_enough():
    # 10 groups per batch from a single bucket of 12 rows: no row twice.
    for step in range(10):
        samples = _global_batch(step, batch_size=10, group_size=4, num_replicas=4, reference_counts=[1] * 12)
        rows_per_group = {group_id: row for row, group_id in samples}
        assert len(set(rows_per_group.values())) == 10


def test_small_bucket_wraps_and_repeats_rows_as_separate_groups():
    # 6 groups per batch from a bucket of 2 rows: each row is drawn 3 times, each draw its own group.
    samples = _global_batch(0, batch_size=12, group_size=2, num_replicas=1, reference_counts=[1, 1])
    rows_per_group = {group_id: row for row, group_id in samples}
    assert len(rows_per_group) == 6
    assert Counter(rows_per_group.values()) == {0: 3, 1: 3}


def test_group_ids_are_unique_across_steps():
    seen = set()
    for step in range(20):
        group_ids = {g for _, g in _global_batch(step, batch_size=6, group_size=3, num_replicas=2)}
        assert not group_ids & seen
        seen |= group_ids
    assert len(seen) == 20 * 4


def test_a_global_batch_shares_one_reference_count():
    steps = 400
    chosen = []
    for step in range(steps):
        samples = _global_batch(step, batch_size=3, group_size=2, num_replicas=2)
        counts = {REFERENCE_COUNTS[row] for row, _ in samples}
        assert len(counts) == 1
        chosen.append(counts.pop())
    # Buckets are chosen in proportion to their rows: 12/20, 5/20, 3/20. Over 400 steps the count of
    # 1-reference batches is Binomial(400, 0.6): mean 240, sd 9.8; +-50 is > 5 sd.
    frequency = Counter(chosen)
    assert set(frequency) == {1, 2, 3}
    assert abs(frequency[1] - 240) < 50
    assert abs(frequency[3] - 60) < 40  # Binomial(400, 0.15): sd 7.1


def test_same_seed_and_step_give_the_same_batch_for_resume():
    kwargs = dict(batch_size=6, group_size=3, num_replicas=2, rank=1, seed=17)
    before = [KRepeatSampler(REFERENCE_COUNTS, **kwargs).batch(step) for step in range(8)]
    resumed = KRepeatSampler(REFERENCE_COUNTS, **kwargs)
    # A resumed run asks for later steps first and in any order.
    assert [resumed.batch(step) for step in reversed(range(8))] == before[::-1]


def test_different_steps_and_seeds_give_different_batches():
    sampler = KRepeatSampler(REFERENCE_COUNTS, batch_size=8, group_size=2, seed=3)
    batches = [tuple(sampler.batch(step).indices) for step in range(10)]
    assert len(set(batches)) == 10
    other_seed = KRepeatSampler(REFERENCE_COUNTS, batch_size=8, group_size=2, seed=4)
    assert [tuple(other_seed.batch(step).indices) for step in range(10)] != batches


def test_indivisible_layout_raises_naming_the_config_fields():
    with pytest.raises(ValueError) as error:
        KRepeatSampler(REFERENCE_COUNTS, batch_size=3, group_size=4, num_replicas=2)
    message = str(error.value)
    assert "sample.train_batch_size" in message
    assert "sample.num_image_per_prompt" in message
    assert "6" in message


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="empty"):
        KRepeatSampler([], batch_size=2, group_size=2)


@pytest.mark.parametrize("num_items, num_replicas", [(10, 3), (7, 7), (3, 4), (0, 2), (16, 4)])
def test_shard_in_order_covers_every_row_exactly_once(num_items, num_replicas):
    shards = [shard_in_order(num_items, num_replicas=num_replicas, rank=rank) for rank in range(num_replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_items))
    assert all(shard == sorted(shard) for shard in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_in_order_by_hand():
    assert shard_in_order(10, num_replicas=3, rank=1) == [1, 4, 7]
