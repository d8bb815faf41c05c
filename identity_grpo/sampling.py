"""Distributed K-repeat sampling: every drawn item appears K times in the global batch.

Written by hand because torch's ``DistributedSampler`` shards a fixed permutation; GRPO needs
each drawn item repeated K times with the copies spread over ranks, and batches whose items
share one reference count (the conditioning length differs between counts, so they cannot be
stacked). Every batch is a pure function of ``(seed, step)``: resuming needs only the step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampledBatch:
    """One rank's share of a global batch.

    Attributes:
        indices: dataset row of each of this rank's ``batch_size`` samples.
        group_ids: group of each sample; the K copies of one draw share an id, which is unique
            across steps (``step * groups_per_batch + draw``), so repeated draws of the same row
            are separate groups.
    """

    indices: list[int]
    group_ids: list[int]


class KRepeatSampler:
    """Yields per-rank batches in which each drawn dataset row appears ``group_size`` times.

    Args:
        reference_counts: number of reference images of every dataset row; a global batch is
            drawn from rows of one count (chosen with probability proportional to its rows).
        batch_size: samples per rank per batch.
        group_size: K, copies of each draw.
        num_replicas, rank: the process layout.
        seed: base seed; all ranks must use the same one.
    """

    def __init__(
        self,
        reference_counts: list[int],
        *,
        batch_size: int,
        group_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        total = batch_size * num_replicas
        if total % group_size != 0:
            raise ValueError(
                f"sample.train_batch_size ({batch_size}) x num_processes ({num_replicas}) = {total} must be "
                f"divisible by sample.num_image_per_prompt ({group_size}); change either"
            )
        if not reference_counts:
            raise ValueError("the dataset is empty")
        self.batch_size = batch_size
        self.group_size = group_size
        self.rank = rank
        self.seed = seed
        self.groups_per_batch = total // group_size
        buckets: dict[int, list[int]] = defaultdict(list)
        for index, count in enumerate(reference_counts):
            buckets[count].append(index)
        self.bucket_counts = sorted(buckets)
        self.buckets = [torch.tensor(buckets[c]) for c in self.bucket_counts]
        self.bucket_weights = torch.tensor([len(b) for b in self.buckets], dtype=torch.float64)

    def batch(self, step: int) -> SampledBatch:
        """This rank's batch for global sampling step ``step`` (identical layout on all ranks)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        bucket = self.buckets[int(torch.multinomial(self.bucket_weights, 1, generator=generator))]
        # Without replacement while the bucket is large enough, wrapping around otherwise.
        order = torch.cat([torch.randperm(len(bucket), generator=generator) for _ in range(
            -(-self.groups_per_batch // len(bucket)))])
        rows = bucket[order[: self.groups_per_batch]]
        draw = torch.arange(self.groups_per_batch).repeat_interleave(self.group_size)
        shuffle = torch.randperm(draw.numel(), generator=generator)
        draw = draw[shuffle][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return SampledBatch(
            indices=rows[draw].tolist(),
            group_ids=(step * self.groups_per_batch + draw).tolist(),
        )


def shard_in_order(num_items: int, *, num_replicas: int, rank: int) -> list[int]:
    """Deterministic evaluation split: rank r gets rows r, r + n, r + 2n, ..."""
    return list(range(rank, num_items, num_replicas))
