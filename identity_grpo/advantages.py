"""Group-normalised advantages, keyed by an integer group id (one per (prompt, references) item)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdvantageStats:
    """What the normalisation saw, for logging."""

    num_groups: int
    num_zero_std_groups: int
    mean_group_size: float


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = False,
    clip_max: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, AdvantageStats]:
    """``(r - mean_group) / std`` for every sample, clipped to ``[-clip_max, clip_max]``.

    Args:
        rewards: ``(N,)`` rewards of every sample in the epoch, gathered from all ranks.
        group_ids: ``(N,)`` integer ids; samples with equal ids were generated from the same
            (prompt, references) item and are compared with each other.
        global_std: divide by the std of all rewards instead of each group's own std.
        clip_max: clip bound of the result.
        eps: added to the std, so a group whose rewards are all equal gets exactly 0.

    Raises:
        ValueError: on NaN/inf rewards (a broken reward must stop the run, not train it),
            or mismatched shapes.
    """
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    rewards = rewards.double()
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        index = bad.nonzero().flatten().tolist()
        raise ValueError(f"non-finite rewards at sample indices {index[:10]}: check the reward functions")

    unique_ids, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = unique_ids.numel()
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]
    if global_std:
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)
        std = torch.sqrt(sq / counts)[inverse]
    advantages = (centred / (std + eps)).clamp(-clip_max, clip_max)
    # The group mean of K equal float64 rewards can miss them by an ulp (3 x 0.1 sums to
    # 0.30000000000000004), leaving ~1e-13 instead of 0, so constant groups are zeroed explicitly.
    constant = zero_std_mask(rewards, group_ids)
    advantages = advantages.masked_fill(constant, 0.0)
    stats = AdvantageStats(
        num_groups=num_groups,
        num_zero_std_groups=torch.unique(group_ids[constant]).numel(),
        mean_group_size=float(counts.double().mean()),
    )
    return advantages.float(), stats


def zero_std_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: True for samples whose group's rewards are all equal (nothing to learn)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    rewards = rewards.double()
    group_max = torch.full((n,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    group_min = torch.full((n,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    group_max = group_max.scatter_reduce(0, inverse, rewards, "amax")
    group_min = group_min.scatter_reduce(0, inverse, rewards, "amin")
    return (group_max == group_min)[inverse]
