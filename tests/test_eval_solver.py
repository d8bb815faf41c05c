"""Evaluation and batch inference sample as the models' own samplers do: the scheduler's step
(Wan's second-order flow UniPC) at the real scheduler configurations, built offline.

VACE: our deterministic call == diffusers' WanVACEPipeline with the same scheduler, noise, prompt
and references. Phantom: == an independent loop written after the official Phantom code
(``phantom_wan/subject2video.py``: the state holds the reference slots, three separate transformer
calls, FlowUniPC on ``linspace(0.999, 0, N + 1)[:-1]`` shifted by 5).
"""

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

from identity_grpo.pipelines.phantom import PhantomRolloutPipeline, fit_on_white_canvas
from identity_grpo.pipelines.vace import VaceRolloutPipeline, frames_to_uint8
from identity_grpo.testing import (
    build_tiny_phantom_dit,
    build_tiny_t2v_pipeline,
    build_tiny_vace_pipeline,
    build_wan_unipc_scheduler,
)

H = W = 32
FRAMES = 5
STEPS = 6
SEQ = 16


def faces():
    return [Image.new("RGB", (40, 30), (200, 60, 40)), Image.new("RGB", (24, 48), (30, 90, 220))]


@pytest.fixture(scope="module")
def vace_pipe():
    pipe = build_tiny_vace_pipeline(seed=0)
    pipe.scheduler = build_wan_unipc_scheduler(3.0)  # Wan2.1-VACE-1.3B's published scheduler
    return pipe


@pytest.mark.parametrize("num_refs", [1, 2])
def test_vace_eval_equals_stock_pipeline_with_unipc(vace_pipe, num_refs):
    refs = faces()[:num_refs]
    rollout = VaceRolloutPipeline(vace_pipe)
    latents = rollout.prepare_latents(1, H, W, FRAMES, num_refs, torch.Generator().manual_seed(3))
    stock = vace_pipe(prompt="a man walks", negative_prompt="", reference_images=list(reversed(refs)), height=H,
                      width=W, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=5.0,
                      latents=latents.clone(), output_type="np", max_sequence_length=SEQ)
    expected = torch.from_numpy(stock.frames)  # (1, F, H, W, 3) in [0, 1]
    kwargs = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=5.0,
                  max_sequence_length=SEQ, latents=latents, sde_steps=[])
    _, frames = rollout(["a man walks"], [refs], **kwargs)
    assert (frames.float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-4
    # The first-order Euler solver (this project's eval before, upstream's) gives another video.
    rollout.ode_solver = "euler"
    _, euler = rollout(["a man walks"], [refs], **kwargs)
    assert (euler.float() / 255 - expected).abs().max() > 2 / 255


@pytest.fixture(scope="module")
def phantom_pipe():
    pipe = build_tiny_t2v_pipeline(seed=0)
    pipe.transformer = build_tiny_phantom_dit(seed=1)
    pipe.scheduler = build_wan_unipc_scheduler(5.0)  # Wan2.1-T2V-1.3B's scheduler with Phantom's shift
    return pipe


@torch.no_grad()
def official_phantom_loop(pipe, prompt, refs, video_noise, s_img, s_text):
    """The official Phantom sampler for one item, restated on diffusers' UniPC."""
    vae, transformer = pipe.vae, pipe.transformer
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    # Official FlowUniPC grid: linspace(sigma_max = 1 - 1/N, 0, N + 1)[:-1], then the flow shift.
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0.0, STEPS + 1)[:-1].copy())
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    positive, negative = pipe.encode_prompt(prompt, negative_prompt="", max_sequence_length=SEQ,
                                            do_classifier_free_guidance=True)
    ref_latents = torch.cat([
        (vae.encode(fit_on_white_canvas(image, H, W)[None, :, None]).latent_dist.mode() - mean) / std for image in refs
    ], dim=2)
    n = ref_latents.shape[2]
    latents = torch.cat([video_noise, torch.zeros_like(ref_latents)], dim=2)  # the ref slots are overwritten
    for t in scheduler.timesteps:
        timestep = t.expand(1)
        with_refs = torch.cat([latents[:, :, :-n], ref_latents], dim=2)
        without = torch.cat([latents[:, :, :-n], torch.zeros_like(ref_latents)], dim=2)
        pos_it = transformer(with_refs, timestep, positive, return_dict=False)[0]
        pos_i = transformer(with_refs, timestep, negative, return_dict=False)[0]
        neg = transformer(without, timestep, negative, return_dict=False)[0]
        noise_pred = neg + s_img * (pos_i - neg) + s_text * (pos_it - pos_i)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    video_latents = latents[:, :, :-n]
    return video_latents, frames_to_uint8(vae.decode(video_latents * std + mean, return_dict=False)[0])


def test_phantom_eval_equals_the_official_loop_with_unipc(phantom_pipe, monkeypatch):
    refs = faces()
    rollout = PhantomRolloutPipeline(phantom_pipe, image_guidance_scale=5.0, text_guidance_scale=7.5)
    rollout.sigma_table = "v0.35"  # the official grid (see identity_grpo.schedules)
    noise = rollout.prepare_latents(1, H, W, FRAMES, len(refs), torch.Generator().manual_seed(4))
    expected_latents, expected_frames = official_phantom_loop(phantom_pipe, "two people talk", refs, noise, 5.0, 7.5)
    decoded = {}
    original_decode = rollout.decode
    monkeypatch.setattr(rollout, "decode", lambda latents: decoded.setdefault("latents", latents) is not None
                        and original_decode(latents))
    _, frames = rollout(["two people talk"], [refs], height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=7.5, max_sequence_length=SEQ, latents=noise, sde_steps=[])
    assert (decoded["latents"] - expected_latents).abs().max() < 1e-4
    assert (frames.int() - expected_frames.int()).abs().max() <= 1


def test_official_phantom_grid_is_the_v035_table():
    from identity_grpo.schedules import unipc_flow_table_v035

    scheduler = build_wan_unipc_scheduler(5.0)
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0.0, 50 + 1)[:-1].copy())
    timesteps, sigmas = unipc_flow_table_v035(50, 5.0)
    assert torch.equal(scheduler.timesteps.cpu(), timesteps)
    torch.testing.assert_close(scheduler.sigmas.cpu().float(), sigmas, rtol=0, atol=1e-7)
