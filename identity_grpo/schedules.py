"""Sigma tables of the Wan2.1 flow-matching schedulers, independent of the installed diffusers.

Wan2.1's diffusers folders (VACE-1.3B, T2V-1.3B) ship a ``UniPCMultistepScheduler`` with flow
sigmas and ``flow_shift`` 3.0 (:data:`WAN_UNIPC_SCHEDULER_CONFIG`). Its ``set_timesteps`` table
changed in diffusers 0.37.0 (PR #12109, "Support custom sigmas in UniPCMultistepScheduler"):

- up to 0.36: unshifted sigmas ``1 - linspace(1, 1/N, n + 1)``, flipped, last dropped
  (0.999 ... 0.04 for n = 25, N = 1000), then shifted;
- from 0.37: ``linspace(1, 1/N, n + 1)[:-1]`` (1.0 ... 0.041), shifted, and a first sigma of
  exactly 1 lowered to ``1 - 1e-6``.

Every unshifted sigma moves up by 1/N; the shift magnifies that towards the end: at 25 steps and
shift 3 the tables differ by up to 0.0026 and 19 of 25 integer timesteps by 1-2. Upstream
Identity-GRPO pins diffusers 0.35.0, so ``sample.sigma_table = "v0.35"`` (the ``vace`` preset)
rebuilds that table here by hand, whatever diffusers is installed; ``"installed"`` takes the
installed scheduler's. FlowMatchEulerDiscreteScheduler (the tiny test models) did not change.
"""

from __future__ import annotations

import numpy as np
import torch

SIGMA_TABLES = ("v0.35", "installed")

# The published scheduler_config.json of Wan-AI/Wan2.1-VACE-1.3B-diffusers and
# Wan-AI/Wan2.1-T2V-1.3B-diffusers (the same file; Phantom overrides flow_shift with 5.0).
WAN_UNIPC_SCHEDULER_CONFIG = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


def is_flow_unipc(scheduler) -> bool:
    """A UniPC scheduler on flow sigmas (the scheduler whose table changed), without dynamic shifting."""
    config = scheduler.config
    return (type(scheduler).__name__ == "UniPCMultistepScheduler" and bool(config.get("use_flow_sigmas"))
            and not config.get("use_dynamic_shifting", False))


def unipc_flow_table_v035(num_inference_steps: int, flow_shift: float,
                          num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps (n,) int64, sigmas (n + 1,) float32)`` exactly as diffusers 0.35.0's
    ``UniPCMultistepScheduler.set_timesteps`` builds them (flow sigmas, final sigma 0)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    unshifted = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    shifted = np.flip(flow_shift * unshifted / (1 + (flow_shift - 1) * unshifted))[:-1].copy()
    timesteps = torch.from_numpy((shifted * num_train_timesteps).copy()).to(torch.int64)  # truncates, as 0.35
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def set_timesteps(scheduler, num_inference_steps: int, sigma_table: str, device=None) -> None:
    """``scheduler.set_timesteps`` with the sigma table ``sigma_table`` ("installed" or "v0.35"),
    so that the scheduler's own ``step`` (multistep state included) runs on that table.

    For "v0.35" on a flow UniPC scheduler of diffusers >= 0.37 the old unshifted grid is passed as
    custom sigmas (the scheduler applies its flow shift to them); diffusers <= 0.36 builds that
    table itself. The result is checked against :func:`unipc_flow_table_v035`.
    """
    if sigma_table not in SIGMA_TABLES:
        raise ValueError(f"unknown sigma table {sigma_table!r}; choose one of {SIGMA_TABLES}")
    if sigma_table == "installed" or not is_flow_unipc(scheduler):
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    config = scheduler.config
    if "sigmas" in scheduler.set_timesteps.__code__.co_varnames:
        grid = np.flip(1.0 - np.linspace(1, 1 / config.num_train_timesteps, num_inference_steps + 1))[:-1].copy()
        scheduler.set_timesteps(sigmas=grid, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps, sigmas = unipc_flow_table_v035(num_inference_steps, config.flow_shift, config.num_train_timesteps)
    if not (torch.equal(scheduler.timesteps.cpu(), timesteps)
            and torch.allclose(scheduler.sigmas.cpu().float(), sigmas, rtol=0, atol=1e-7)):
        raise RuntimeError(f"{type(scheduler).__name__} did not reproduce diffusers 0.35's sigma table; "
                           "set config.sample.sigma_table = 'installed'")
