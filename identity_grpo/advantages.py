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


def update_mask(advantages: torch.Tensor, constant_group: torch.Tensor, mode: str) -> torch.Tensor:
    """``(N,)`` bool: the samples that take part in the update (``train.filter_zero_advantage``).

    - ``"sample"`` (upstream Identity-GRPO): drop every sample whose advantage is exactly 0 (all
      of a constant-reward group, and any sample that equals its group's mean).
    - ``"group"``: drop the samples of constant-reward groups (``constant_group``).
    - ``"none"``: keep everything (zero-advantage samples then only feel the KL term).

    Upstream, a rank left with no sample adds 1e-6 to every advantage and trains on all of them;
    here the caller keeps the (identical) backward calls with a zero loss instead.
    """
    if mode == "sample":
        return advantages != 0
    if mode == "group":
        return ~constant_group.to(advantages.device)
    if mode == "none":
        return torch.ones_like(advantages, dtype=torch.bool)
    raise ValueError(f"unknown filter_zero_advantage mode {mode!r}; use 'sample', 'group' or 'none'")


def weighted_group_advantages(
    rewards: dict[str, torch.Tensor],
    group_ids: torch.Tensor,
    weights: dict[str, float],
    *,
    level: str = "reward",
    global_std: bool = False,
    clip_max: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, AdvantageStats]:
    """Advantages of several rewards combined with ``weights``, at the reward or the advantage level.

    - ``level="reward"``: ``group_advantages(sum_k w_k * r_k)``: one normalisation of the weighted sum.
    - ``level="advantage"``: ``clip(sum_k w_k * group_advantages(r_k))``: each reward is normalised
      within its group first, so a reward with a large spread cannot drown a reward with a small one
      (GRPO's normalisation would otherwise divide both by the spread of their sum).

    Args:
        rewards: key -> ``(N,)`` rewards of every sample in the epoch (gathered from all ranks).
            Keys not in ``weights`` are ignored.
        group_ids: ``(N,)`` integer group ids, as in :func:`group_advantages`.
        weights: key -> weight; every key must be in ``rewards``.
        level: ``"reward"`` or ``"advantage"``.
        global_std, clip_max, eps: as in :func:`group_advantages` (applied to each reward at the
            advantage level, and the weighted sum is clipped to ``[-clip_max, clip_max]`` again).

    Returns:
        ``(N,)`` float32 advantages and the stats; at the advantage level a group counts as
        zero-std only if every weighted reward is constant in it.

    Raises:
        ValueError: unknown level, a weighted key missing from ``rewards``, no weights, or the
            errors of :func:`group_advantages` (NaN/inf rewards, shapes).
    """
    if level not in ("reward", "advantage"):
        raise ValueError(f"level must be 'reward' or 'advantage', got {level!r}")
    if not weights:
        raise ValueError("weights is empty: name at least one reward key to combine")
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"weighted reward key(s) {missing} are not among the rewards {sorted(rewards)}")
    if level == "reward":
        total = sum(float(w) * rewards[key].double() for key, w in weights.items())
        return group_advantages(total, group_ids, global_std=global_std, clip_max=clip_max, eps=eps)
    combined = torch.zeros(group_ids.shape, dtype=torch.float64, device=group_ids.device)
    constant = torch.ones(group_ids.shape, dtype=torch.bool, device=group_ids.device)
    stats = None
    for key, weight in weights.items():
        advantages, stats = group_advantages(
            rewards[key], group_ids, global_std=global_std, clip_max=clip_max, eps=eps
        )
        combined = combined + float(weight) * advantages.double()
        constant &= zero_std_mask(rewards[key], group_ids)
    stats = AdvantageStats(
        num_groups=stats.num_groups,
        num_zero_std_groups=torch.unique(group_ids[constant]).numel(),
        mean_group_size=stats.mean_group_size,
    )
    return combined.clamp(-clip_max, clip_max).float(), stats
