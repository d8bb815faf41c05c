"""DiffusionNFT's forward-process objective (Zheng et al., ICLR 2026; NVlabs/DiffusionNFT,
``scripts/train_nft_sd3.py``), as pure functions of tensors.

No log-probs, no SDE: the old policy samples clean videos ``x0`` with any deterministic sampler,
rewards become an optimality probability ``r`` per sample, and training re-noises ``x0`` at fresh
timesteps, ``x_t = (1 - t) x0 + t eps``, and pulls an implicit positive policy towards ``x0`` (for
``r = 1``) and an implicit negative one towards it (for ``r = 0``):

    v+ = beta v_theta + (1 - beta) v_old        v- = (1 + beta) v_old - beta v_theta

(``v_old`` detached). Both are scored in x0-space, ``x0_hat = x_t - t v``, each squared error
divided by its detached per-sample mean absolute error (DiffusionNFT's adaptive weighting), and
combined as ``adv_clip_max * mean((r L+ + (1 - r) L-) / beta)``. ``beta`` here is NFT's
interpolation strength (``train.nft_beta``), not the KL weight (``train.beta``), which multiplies
the velocity distance to the frozen base model. Everything is upcast to float32 (the weights to
float64, as the reference does); reductions are means over every non-batch dim, so 5-D video
latents work.
"""

from __future__ import annotations

import torch

OLD_POLICY_DECAY_TYPES = (0, 1, 2)


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """``r = clamp(clip(A, +-c) / c / 2 + 0.5, 0, 1)``: advantage ``-c`` -> 0, ``0`` -> 0.5, ``+c`` -> 1."""
    clipped = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _adaptive_x0_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean((x0_hat - x0)^2) / mean|x0_hat - x0|`` per sample, the denominator detached and
    bounded below by 1e-5 (DiffusionNFT's adaptive weighting)."""
    with torch.no_grad():
        weight = (x0_hat.double() - x0.double()).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-5)
    return _per_sample_mean((x0_hat - x0) ** 2 / weight)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    nft_beta: float,
    adv_clip_max: float,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss for a batch of B samples at one timestep each.

    Args:
        v_theta: ``(B, ...)`` the trained policy's velocity (with gradients).
        v_old: ``(B, ...)`` the old (sampling) policy's velocity; detached here.
        x_t, x0: ``(B, ...)`` the noised and the clean latents.
        t: ``(B,)`` the noise level of ``x_t`` (sigma in [0, 1]).
        r: ``(B,)`` optimality probabilities (:func:`optimality_probability`).
        nft_beta: interpolation strength beta > 0.
        adv_clip_max: the advantage clip bound; DiffusionNFT scales the policy loss by it.
        v_ref: ``(B, ...)`` the frozen base model's velocity, for the KL term.
        kl_weight: weight of ``mean((v_theta - v_ref)^2)``.

    Returns:
        ``(loss, stats)``: the scalar loss and detached ``policy_loss``, ``kl``,
        ``positive_loss``, ``negative_loss``, ``old_deviation`` (mean squared distance to v_old).
    """
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}")
    v_theta, x_t, x0 = v_theta.float(), x_t.float(), x0.float()
    v_old = v_old.float().detach()
    t = t.float().reshape(-1, *([1] * (x0.ndim - 1)))
    r = r.float()
    v_positive = nft_beta * v_theta + (1 - nft_beta) * v_old
    v_negative = (1 + nft_beta) * v_old - nft_beta * v_theta
    positive_loss = _adaptive_x0_loss(x_t - t * v_positive, x0)
    negative_loss = _adaptive_x0_loss(x_t - t * v_negative, x0)
    policy_loss = ((r * positive_loss + (1 - r) * negative_loss) / nft_beta * adv_clip_max).mean()
    loss = policy_loss
    kl = torch.zeros((), device=v_theta.device)
    if v_ref is not None:
        kl = _per_sample_mean((v_theta - v_ref.float().detach()) ** 2).mean()
        loss = loss + kl_weight * kl
    stats = {
        "policy_loss": policy_loss.detach(),
        "kl": kl.detach(),
        "positive_loss": positive_loss.mean().detach(),
        "negative_loss": negative_loss.mean().detach(),
        "old_deviation": _per_sample_mean((v_theta - v_old) ** 2).mean().detach(),
    }
    return loss, stats


def old_policy_decay(step: int, decay_type: int = 1) -> float:
    """DiffusionNFT's decay of the old-policy EMA after optimizer step ``step``: the old adapter
    becomes ``decay * old + (1 - decay) * trained`` after each epoch.

    - type 0: 0 (the old policy is a copy of the trained one);
    - type 1 (its default): ``min(0.001 step, 0.5)``;
    - type 2: 0 for 75 steps, then ``min(0.0075 (step - 75), 0.999)``.
    """
    if decay_type not in OLD_POLICY_DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {OLD_POLICY_DECAY_TYPES}, got {decay_type}")
    flat, rate, ceiling = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, ceiling)


def draw_timesteps(mode: str, count: int, batch: int, *, sampler_timesteps: torch.Tensor | None = None,
                   num_train_timesteps: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(count, batch)`` float timesteps (``t * num_train_timesteps``) at which each clean sample is trained.

    - ``"sampler"`` (DiffusionNFT): each sample gets ``count`` distinct timesteps of the sampling
      schedule, in a random order (a per-sample permutation, the first ``count`` kept);
    - ``"uniform"``: ``t ~ U(0, 1)``; ``"logit_normal"``: ``t = sigmoid(N(0, 1))``; both kept in
      ``[1e-3, 1 - 1e-3]``.
    """
    if mode == "sampler":
        if sampler_timesteps is None or count > len(sampler_timesteps):
            raise ValueError(f"'sampler' timesteps need count ({count}) <= the schedule's steps")
        order = torch.stack([torch.randperm(len(sampler_timesteps), generator=generator)[:count] for _ in range(batch)],
                            dim=1)
        return sampler_timesteps.float().cpu()[order]
    if mode == "uniform":
        t = torch.rand(count, batch, generator=generator)
    elif mode == "logit_normal":
        t = torch.sigmoid(torch.randn(count, batch, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}; use 'sampler', 'uniform' or 'logit_normal'")
    return t.clamp(1e-3, 1 - 1e-3) * num_train_timesteps
