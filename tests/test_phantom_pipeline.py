"""The batched Phantom rollout against a plain reference loop, exact re-scoring, and references."""

import math

import pytest
import torch
from PIL import Image

from identity_grpo.pipelines.phantom import PhantomRolloutPipeline, fit_on_white_canvas
from identity_grpo.pipelines.vace import SDEConfig, frames_to_uint8
from identity_grpo.testing import build_tiny_phantom_dit, build_tiny_t2v_pipeline

H = W = 32
FRAMES = 5
LATENT_FRAMES = 2  # (5 - 1) // 4 + 1
STEPS = 4
SEQ = 16
S_IMG, S_TEXT = 2.5, 4.0  # not Phantom's defaults, so a swapped pair of scales would show


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_t2v_pipeline(seed=0)
    pipe.transformer = build_tiny_phantom_dit(seed=1)
    return pipe


@pytest.fixture(scope="module")
def rollout(pipe):
    return PhantomRolloutPipeline(pipe, image_guidance_scale=S_IMG, text_guidance_scale=S_TEXT)


def faces():
    return [Image.new("RGB", (40, 30), (200, 60, 40)), Image.new("RGB", (24, 48), (30, 90, 220)),
            Image.new("RGB", (32, 32), (40, 200, 60)), Image.new("RGB", (50, 20), (128, 128, 128))]


def test_canvas_keeps_aspect_on_white():
    # 40x20 (W x H) onto 32x32: scale 0.8 -> 32x16, centred: rows 8..23 image, the rest white.
    canvas = fit_on_white_canvas(Image.new("RGB", (40, 20), (255, 0, 0)), 32, 32)
    assert canvas.shape == (3, 32, 32)
    assert bool((canvas[:, :8] == 1).all()) and bool((canvas[:, 24:] == 1).all())
    assert torch.allclose(canvas[:, 8:24], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 32))


def test_canvas_truncates_the_scaled_side_as_official_phantom():
    # 45x29 (W x H) onto 32x32: ratio 1.5517 > 1 -> width 32, height int(32 / 1.5517) = int(20.62) = 20 (rounding
    # would give 21); top padding (32 - 20) // 2 = 6.
    canvas = fit_on_white_canvas(Image.new("RGB", (45, 29), (0, 0, 255)), 32, 32)
    image_rows = (canvas != 1).any(dim=0).any(dim=1).nonzero().flatten()
    assert (int(image_rows[0]), int(image_rows[-1])) == (6, 25)
    # 29x45 (W x H) onto 32x48: ratio 0.644 < 0.667 -> height 48, width int(48 * 0.6444) = int(30.93) = 30.
    canvas = fit_on_white_canvas(Image.new("RGB", (29, 45), (0, 0, 255)), 48, 32)
    image_cols = (canvas != 1).any(dim=0).any(dim=0).nonzero().flatten()
    assert (int(image_cols[0]), int(image_cols[-1])) == (1, 30)


@torch.no_grad()
def reference_loop(pipe, prompt, refs, video_noise):
    """Phantom's sampler for ONE item, written plainly: references appended to the state, three
    separate transformer calls, the scheduler's own Euler step on the whole state, references
    overwritten clean after every step, dropped before decoding."""
    vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompt, negative_prompt="", max_sequence_length=SEQ,
                                                        do_classifier_free_guidance=True)
    ref_latents = torch.cat([
        (vae.encode(fit_on_white_canvas(image, H, W)[None, :, None]).latent_dist.mode() - mean) / std
        for image in refs
    ], dim=2)
    n = ref_latents.shape[2]
    scheduler.set_timesteps(STEPS)
    latents = torch.cat([video_noise, ref_latents], dim=2)
    for t in scheduler.timesteps:
        timestep = t.expand(1)
        pos_it = transformer(latents, timestep, prompt_embeds, return_dict=False)[0]
        pos_i = transformer(latents, timestep, negative_embeds, return_dict=False)[0]
        no_refs = torch.cat([latents[:, :, :-n], torch.zeros_like(ref_latents)], dim=2)
        neg = transformer(no_refs, timestep, negative_embeds, return_dict=False)[0]
        noise_pred = neg + S_IMG * (pos_i - neg) + S_TEXT * (pos_it - pos_i)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        latents = torch.cat([latents[:, :, :-n], ref_latents], dim=2)
    video_latents = latents[:, :, :-n]
    video = vae.decode(video_latents * std + mean, return_dict=False)[0]
    return video_latents, frames_to_uint8(video)


def test_ode_rollout_matches_reference_loop(pipe, rollout, monkeypatch):
    num_refs = 2
    refs = faces()[:num_refs]
    noise = rollout.prepare_latents(1, H, W, FRAMES, num_refs, torch.Generator().manual_seed(3))
    expected_latents, expected_frames = reference_loop(pipe, "a man walks", refs, noise)
    decoded = {}
    original_decode = rollout.decode
    monkeypatch.setattr(rollout, "decode", lambda latents: decoded.setdefault("latents", latents) is not None
                        and original_decode(latents))
    _, frames = rollout(["a man walks"], [refs], height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=S_TEXT, max_sequence_length=SEQ, latents=noise, sde_steps=[])
    assert decoded["latents"].shape == (1, 4, LATENT_FRAMES, H // 8, W // 8)
    assert (decoded["latents"] - expected_latents).abs().max() < 1e-5
    assert frames.shape == (1, FRAMES, H, W, 3) and frames.dtype == torch.uint8
    assert (frames.int() - expected_frames.int()).abs().max() <= 1  # uint8 rounding of ~1e-6 differences


def test_guidance_off_is_the_conditional_branch(pipe, rollout):
    refs = rollout.encode_references([faces()[:2]], H, W)
    latents = torch.randn(1, 4, LATENT_FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))
    prompt = rollout.encode_prompts(["a woman smiles"], SEQ)
    timestep = torch.tensor(700.0)
    got = rollout.predict_noise(latents, timestep, prompt, rollout.negative_embeds("", SEQ), refs, guidance_scale=1.0)
    full = pipe.transformer(torch.cat([latents, refs], 2), timestep.expand(1), prompt, return_dict=False)[0]
    assert got.shape == latents.shape
    assert (got - full[:, :, :LATENT_FRAMES]).abs().max() < 1e-6


def test_rescore_gives_ratio_one_and_video_only_log_probs(rollout):
    refs = [faces()[:2], faces()[1:3]]
    sde = SDEConfig(schedule="identity_grpo", noise_level=1.0)
    rollouts, _ = rollout(["a man walks", "two people talk"], refs, height=H, width=W, num_frames=FRAMES,
                          num_inference_steps=3, guidance_scale=S_TEXT, max_sequence_length=SEQ,
                          sde_steps=[0, 1], sde=sde, generator=torch.Generator().manual_seed(7),
                          group_ids=[4, 4])
    assert rollouts.latents.shape == (2, 2, 4, LATENT_FRAMES, 4, 4)  # video frames only, no reference slots
    assert rollouts.conditioning.shape == (2, 4, 2, 4, 4)
    assert rollouts.log_probs.shape == (2, 2) and rollouts.group_ids.tolist() == [4, 4]
    for step in range(rollouts.num_steps):
        out = rollout.rescore(rollouts, step, guidance_scale=S_TEXT, sde=sde)
        ratio = torch.exp(out.log_prob - rollouts.log_probs[:, step])
        assert (ratio - 1).abs().max() < 1e-5
        # The log-prob is the MEAN of Normal(mean, std).log_prob over the video-frame elements.
        by_hand = torch.distributions.Normal(out.prev_sample_mean, out.std).log_prob(
            rollouts.next_latents[:, step]).mean(dim=(1, 2, 3, 4))
        assert torch.allclose(out.log_prob, by_hand, atol=1e-5)
    # select() keeps every rollout's own references.
    second = rollouts.select(torch.tensor([1]))
    assert torch.equal(second.conditioning, rollouts.conditioning[1:])
    again = rollout.rescore(second, 0, guidance_scale=S_TEXT, sde=sde)
    assert abs(float(again.log_prob.detach()[0] - rollouts.log_probs[1, 0])) < 1e-5


@pytest.mark.parametrize("num_refs", [1, 2, 3, 4])
def test_references_in_input_order_never_decoded(rollout, num_refs):
    refs = faces()[:num_refs]
    conditioning = rollout.encode_references([refs], H, W)
    assert conditioning.shape == (1, 4, num_refs, 4, 4)
    for position, image in enumerate(refs):  # input order along time
        alone = rollout.encode_references([[image]], H, W)
        assert (conditioning[:, :, position] - alone[:, :, 0]).abs().max() < 1e-5
    rollouts, frames = rollout(["two people"], [refs], height=H, width=W, num_frames=FRAMES,
                               num_inference_steps=2, guidance_scale=S_TEXT, max_sequence_length=SEQ,
                               generator=torch.Generator().manual_seed(num_refs))
    assert frames.shape == (1, FRAMES, H, W, 3)
    # The decoded video is exactly the decode of the final VIDEO latents: no reference frame in it.
    assert rollouts.next_latents.shape[3] == LATENT_FRAMES
    assert torch.equal(rollout.decode(rollouts.next_latents[:, -1]), frames)
    assert math.isfinite(float(rollouts.log_probs.sum()))


def test_references_change_the_video(rollout):
    noise = rollout.prepare_latents(1, H, W, FRAMES, 1, torch.Generator().manual_seed(0))
    videos = [rollout(["a man"], [[face]], height=H, width=W, num_frames=FRAMES, num_inference_steps=1,
                      guidance_scale=S_TEXT, max_sequence_length=SEQ, latents=noise, sde_steps=[])[1]
              for face in faces()[:2]]
    assert (videos[0].float() - videos[1].float()).abs().mean() > 0.5


def test_bad_inputs_name_the_fix(rollout):
    call = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=1, guidance_scale=S_TEXT,
                max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="1-4 reference images"):
        rollout(["a"], [faces() + faces()[:1]], **call)
    with pytest.raises(ValueError, match="one reference count"):
        rollout(["a", "b"], [faces()[:1], faces()[:2]], **call)
    with pytest.raises(ValueError, match="conditioning_scale"):
        rollout(["a"], [faces()[:1]], conditioning_scale=0.5, **call)
    vace_shaped = torch.zeros(1, 4, LATENT_FRAMES + 1, 4, 4)  # with a reference slot, as VACE's latents
    with pytest.raises(ValueError, match="video frames only"):
        rollout(["a"], [faces()[:1]], latents=vace_shaped, **call)
