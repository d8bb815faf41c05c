"""The flow-matching sampler as an SDE: one step, its Gaussian log-density, and the KL term.

Flow matching (Wan convention): ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` and the model
predicts the velocity ``v = noise - x_0``. The deterministic sampler is the Euler ODE step
``x_next = x + (sigma_next - sigma) * v``. Flow-GRPO turns it into an SDE with the same
marginals; one Euler-Maruyama step is a Gaussian ``N(mean, std^2 I)`` whose log-density is
what GRPO's importance ratio needs.

Everything here is a pure function of tensors: no scheduler state is read or mutated, so the
same call re-scores a stored transition exactly. Inputs may be any dtype; the arithmetic runs
in float32. ``sigma`` / ``sigma_next`` are per-sample tensors of shape ``(B,)`` (or scalars)
and broadcast over any number of trailing dims, so 5-D video latents ``(B, C, F, H, W)`` work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE_SCHEDULES = ("identity_grpo", "flow_grpo", "cps", "cps_exact")
# Schedules whose final step (sigma_next = 0) has no noise: it is taken as its mean and never trained.
NOISELESS_FINAL_STEP = ("cps", "cps_exact")


@dataclass
class SDEStepOutput:
    """Result of one SDE step.

    Attributes:
        prev_sample: ``(B, ...)`` the next state ``x_{sigma_next}`` (float32).
        log_prob: ``(B,)`` mean per-element Gaussian log-density of ``prev_sample``, or None
            when the step is deterministic (ODE / zero noise), where no density exists.
        prev_sample_mean: ``(B, ...)`` the Gaussian's mean (float32).
        std: ``(B, 1, ...)`` the Gaussian's standard deviation, broadcastable to the sample.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    prev_sample_mean: torch.Tensor
    std: torch.Tensor


def _as_batch(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> float32 tensor shaped (B, 1, ..., 1) to broadcast against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def noise_scale(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    schedule: str,
    noise_level: float,
    sigma_max: float,
    sigma_min: float,
) -> torch.Tensor:
    """Diffusion coefficient of the step, before multiplying by ``sqrt(-dt)``.

    - ``identity_grpo`` (upstream Identity-GRPO): ``sigma_min + (sigma_max - sigma_min) * sigma``,
      with ``sigma_max`` / ``sigma_min`` the largest non-terminal and the last sigma of the schedule.
      ``noise_level`` scales it (1.0 reproduces upstream).
    - ``flow_grpo``: ``noise_level * sqrt(sigma / (1 - min(sigma, sigma_max)))``; the numerator keeps
      ``sigma``. Flow-GRPO replaces the denominator's ``sigma`` by ``sigma_max`` only where
      ``sigma == 1`` (FlowMatchEuler's first sigma). Bounding it by ``sigma_max`` instead gives the
      same value there and also covers schedules that start just below 1: Wan2.1's UniPC starts at
      ``1 - 1e-6`` (flow_shift 3), where the unbounded form gives a std of ~81 at noise level 0.7.
    - ``cps`` / ``cps_exact`` (coefficients-preserving sampling): the *total* std of the step,
      ``sigma_next * sin(noise_level * pi / 2)``; it is not multiplied by ``sqrt(-dt)``. It is 0 on
      the final step (``sigma_next == 0``), which is then deterministic.
    """
    if schedule == "identity_grpo":
        return noise_level * (sigma_min + (sigma_max - sigma_min) * sigma)
    if schedule == "flow_grpo":
        return noise_level * torch.sqrt(sigma / (1.0 - sigma.clamp_max(sigma_max)))
    if schedule in ("cps", "cps_exact"):
        return sigma_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {NOISE_SCHEDULES}")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample MEAN over non-batch dims of the elementwise ``Normal(mean, std).log_prob(x)``.

    A mean rather than a sum keeps the log-ratio O(1) independent of the video size, which is
    what the (small) PPO clip ranges of Flow-GRPO / Identity-GRPO are tuned for.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def squared_error_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's CPS log-probability: per-sample MEAN over non-batch dims of ``-(x - mean)^2``.

    The Gaussian's constants and its ``1 / (2 std^2)`` scale are dropped (Flow-GRPO,
    ``sde_type == "cps"``). The scale does not cancel in an importance ratio: the exact density's
    log-ratio is ``1 / (2 std^2)`` times this one's (about 0.6x to 8000x over a 25-step Wan schedule
    at noise level 0.7), and Flow-GRPO's CPS clip ranges are tuned to this form. It is also defined
    where the std is 0 (the final step).
    """
    error = (x.float() - mean.float()) ** 2
    return -error.mean(dim=tuple(range(1, error.ndim)))


def sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    schedule: str = "identity_grpo",
    noise_level: float = 1.0,
    sigma_max: float = 1.0,
    sigma_min: float = 0.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    deterministic: bool = False,
) -> SDEStepOutput:
    """One Euler-Maruyama step of the reverse SDE from ``sigma`` to ``sigma_next``.

    Sample mode (``prev_sample is None``): draws ``prev_sample = mean + std * eps`` using
    ``noise`` if given, else ``generator``. Re-score mode: evaluates the log-density of the
    given ``prev_sample`` under the step's Gaussian (gradients flow through the mean).
    ``deterministic=True`` takes the Euler ODE step and returns ``log_prob=None``.

    For ``identity_grpo`` / ``flow_grpo`` the mean is the Flow-GRPO drift
    ``x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt`` and the std is
    ``s * sqrt(-dt)``; with ``s = 0`` this is exactly the Euler step. For ``cps`` / ``cps_exact``
    the mean is ``x0_hat (1 - sigma_next) + eps_hat sqrt(sigma_next^2 - std^2)``; ``cps`` scores
    with :func:`squared_error_log_prob` (Flow-GRPO's form, also on the noiseless final step),
    ``cps_exact`` with the Gaussian density (None where the std is 0).
    """
    if prev_sample is not None and (generator is not None or noise is not None):
        raise ValueError("pass either prev_sample (re-score) or generator/noise (sample), not both")
    model_output = model_output.float()
    sample = sample.float()
    sigma = _as_batch(sigma, sample)
    sigma_next = _as_batch(sigma_next, sample)
    dt = sigma_next - sigma

    if deterministic:
        mean = sample + dt * model_output
        return SDEStepOutput(mean, None, mean, torch.zeros_like(sigma))

    scale = noise_scale(
        sigma, sigma_next, schedule=schedule, noise_level=noise_level, sigma_max=sigma_max, sigma_min=sigma_min
    )
    if schedule in ("cps", "cps_exact"):
        std = scale
        x0_hat = sample - sigma * model_output
        eps_hat = sample + (1.0 - sigma) * model_output
        mean = x0_hat * (1.0 - sigma_next) + eps_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0.0))
    else:
        std = scale * torch.sqrt(-dt)
        mean = (
            sample * (1.0 + scale**2 / (2.0 * sigma) * dt)
            + model_output * (1.0 + scale**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
        )

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean + std * noise.float()
    else:
        prev_sample = prev_sample.float()

    if schedule == "cps":
        return SDEStepOutput(prev_sample, squared_error_log_prob(prev_sample.detach(), mean), mean, std)
    if bool((std <= 0).any()):
        return SDEStepOutput(prev_sample, None, mean, std)
    return SDEStepOutput(prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std), mean, std)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over non-batch dims of KL(N(mean_p, std^2) || N(mean_q, std^2)).

    With equal stds the closed form is ``(mean_p - mean_q)^2 / (2 std^2)`` elementwise; the
    mean (not sum) matches the reduction of :func:`gaussian_log_prob`.
    """
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
