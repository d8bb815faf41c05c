"""The SDE on the real Wan2.1 scheduler configurations, and diffusers 0.35's sigma table.

The schedulers are built offline from the published scheduler_config.json values
(identity_grpo.testing.build_wan_unipc_scheduler): UniPC with flow shift 3.0 (VACE-1.3B,
T2V-1.3B) and 5.0 (Phantom).
"""

import math

import numpy as np
import pytest
import torch

from identity_grpo.schedules import is_flow_unipc, unipc_flow_table_v035
from identity_grpo.sde import NOISE_SCHEDULES, sde_step
from identity_grpo.testing import build_wan_unipc_scheduler

# diffusers 0.35.0's UniPCMultistepScheduler(**WAN_UNIPC_SCHEDULER_CONFIG).set_timesteps(25), as printed by that
# release (sigmas rounded to 6 decimals): the table upstream Identity-GRPO trains on.
V035_TIMESTEPS_25 = [999, 985, 971, 956, 939, 922, 904, 884, 864, 841, 817, 792, 764, 734, 701, 666, 627, 585, 538,
                     486, 428, 363, 290, 206, 111]
V035_SIGMAS_25 = [0.999666, 0.985963, 0.971489, 0.956175, 0.939947, 0.922722, 0.904403, 0.884883, 0.864040,
                  0.841736, 0.817810, 0.792079, 0.764331, 0.734319, 0.701754, 0.666296, 0.627542, 0.585009,
                  0.538116, 0.486158, 0.428265, 0.363361, 0.290088, 0.206718, 0.111008, 0.0]


def test_v035_table_matches_diffusers_0_35():
    timesteps, sigmas = unipc_flow_table_v035(25, 3.0)
    assert timesteps.tolist() == V035_TIMESTEPS_25
    np.testing.assert_allclose(sigmas.numpy(), V035_SIGMAS_25, atol=5e-7)
    assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.int64


@pytest.mark.parametrize("steps, shift", [(25, 3.0), (50, 3.0), (25, 5.0), (50, 5.0)])
def test_v035_table_is_the_installed_schedulers_shift_of_the_old_grid(steps, shift):
    """Cross-check of the hand-written table against the installed diffusers' own shift code: the
    0.35 grid passed as custom sigmas (diffusers >= 0.37) gives the same table."""
    scheduler = build_wan_unipc_scheduler(shift)
    if "sigmas" not in scheduler.set_timesteps.__code__.co_varnames:
        pytest.skip("the installed diffusers (< 0.37) takes no custom sigmas; its own table is the 0.35 one")
    grid = np.flip(1.0 - np.linspace(1, 1 / 1000, steps + 1))[:-1].copy()
    scheduler.set_timesteps(sigmas=grid)
    timesteps, sigmas = unipc_flow_table_v035(steps, shift)
    assert torch.equal(scheduler.timesteps.cpu(), timesteps)
    assert torch.equal(scheduler.sigmas.cpu().float(), sigmas)


def test_installed_table_differs_from_upstreams_and_the_pipeline_picks_by_config():
    from identity_grpo.pipelines.vace import VaceRolloutPipeline
    from identity_grpo.testing import build_tiny_vace_pipeline

    pipe = build_tiny_vace_pipeline(seed=0)
    pipe.scheduler = build_wan_unipc_scheduler(3.0)
    pipeline = VaceRolloutPipeline(pipe)
    assert is_flow_unipc(pipe.scheduler)
    installed_timesteps, installed_sigmas = pipeline.schedule(25)
    pipeline.sigma_table = "v0.35"
    timesteps, sigmas = pipeline.schedule(25)
    assert timesteps.tolist() == V035_TIMESTEPS_25
    # diffusers >= 0.37 starts at 1 - 1e-6 and moves every other sigma up (by up to 0.0026 here).
    if float(installed_sigmas[0]) > 0.9999:
        assert (installed_sigmas[:-1] - sigmas[:-1]).min() > 0
        assert (installed_sigmas - sigmas).abs().max() < 0.003


@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
@pytest.mark.parametrize("table", ["installed", "v0.35"])
@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_sde_rollout_on_the_wan_schedule_stays_bounded(schedule, table, flow_shift):
    """25 SDE steps with the exact velocity of a point-mass data distribution (v = (x - x0) / sigma)
    end near x0 for every noise form. Before the flow_grpo denominator was bounded by sigma_max, the
    first step's std on the installed table (sigma_0 = 1 - 1e-6) was ~81 at noise level 0.7."""
    if table == "installed":
        scheduler = build_wan_unipc_scheduler(flow_shift)
        scheduler.set_timesteps(25)
        sigmas = scheduler.sigmas.float()
    else:
        sigmas = unipc_flow_table_v035(25, flow_shift)[1]
    sigma_max, sigma_min = float(sigmas[1]), float(sigmas[-1])
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 3, 8, 8, generator=generator) * 0.5
    noise = torch.randn(x0.shape, generator=generator)
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    noise_level = 1.0 if schedule == "identity_grpo" else 0.7
    stds = []
    for index in range(25):
        velocity = (x - x0) / sigmas[index]
        out = sde_step(velocity, x, sigmas[index], sigmas[index + 1], schedule=schedule, noise_level=noise_level,
                       sigma_max=sigma_max, sigma_min=sigma_min, generator=generator)
        stds.append(float(out.std.max()))
        x = out.prev_sample
    assert max(stds) < 1.0, stds
    if schedule == "flow_grpo":
        expected = noise_level * math.sqrt(float(sigmas[0]) / (1 - sigma_max)) * math.sqrt(float(sigmas[0] - sigmas[1]))
        assert stds[0] == pytest.approx(expected, rel=1e-5)
    # The last step lands at x0 plus that step's noise (none for CPS); all states stayed bounded.
    assert (x - x0).abs().max().item() < 6.0 * max(stds[-1], 1e-6) + 1e-4
