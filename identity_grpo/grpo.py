"""The clipped GRPO objective with a KL penalty, as a pure function of per-sample tensors."""

from __future__ import annotations

import torch


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate plus ``beta * KL``, averaged over the batch.

    Args:
        log_prob: ``(B,)`` log-density of the stored transition under the current policy
            (with grad).
        old_log_prob: ``(B,)`` log-density recorded at sampling time.
        advantages: ``(B,)`` group-normalised (already clipped) advantages.
        clip_range: ratios outside ``[1 - clip_range, 1 + clip_range]`` stop contributing
            gradient in the direction that moves them further out.
        kl: ``(B,)`` KL(policy || reference) for the same step, or None when ``beta == 0``.
        beta: weight of the KL penalty.

    Returns:
        ``(loss, stats)`` where stats are detached scalars: ``policy_loss``, ``kl``,
        ``clipfrac`` (fraction of ratios outside the clip range), ``approx_kl``
        (``0.5 * E[(log r)^2]``, the estimator Flow-GRPO logs) and ``ratio`` (mean).
    """
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the KL term; pass kl=")
    advantages = advantages.float()
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.float().mean() if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy_loss + beta * kl_mean
    stats = {
        "policy_loss": policy_loss.detach(),
        "kl": kl_mean.detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "approx_kl": (0.5 * log_ratio**2).mean().detach(),
        "ratio": ratio.mean().detach(),
    }
    return loss, stats
