"""The batched VACE rollout against diffusers' own WanVACEPipeline, and exact re-scoring."""

import pytest
import torch
from PIL import Image

from identity_grpo.pipelines.vace import SDEConfig, VaceRolloutPipeline, frames_to_uint8
from identity_grpo.testing import build_tiny_vace_pipeline, randomize_lora_b

H = W = 32
FRAMES = 5
STEPS = 4
GUIDANCE = 5.0
SEQ = 16


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_vace_pipeline(seed=0)


@pytest.fixture(scope="module")
def rollout(pipe):
    return VaceRolloutPipeline(pipe)


def faces():
    red = Image.new("RGB", (40, 30), (200, 60, 40))
    blue = Image.new("RGB", (24, 48), (30, 90, 220))
    green = Image.new("RGB", (32, 32), (40, 200, 60))
    grey = Image.new("RGB", (50, 20), (128, 128, 128))
    return [red, blue, green, grey]


def reference_video(pipe, prompt, refs, latents):
    out = pipe(prompt=prompt, negative_prompt="", reference_images=refs, height=H, width=W, num_frames=FRAMES,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(), output_type="np",
               max_sequence_length=SEQ)
    return torch.from_numpy(out.frames)  # (1, F, H, W, 3) float in [0, 1]


@pytest.mark.parametrize("num_refs", [1, 2])
def test_ode_rollout_matches_diffusers_pipeline(pipe, rollout, num_refs):
    refs = faces()[:num_refs]
    latents = rollout.prepare_latents(1, H, W, FRAMES, num_refs, torch.Generator().manual_seed(3))
    # diffusers prepends references one at a time, reversing them; we keep input order.
    expected = reference_video(pipe, "a man walks", list(reversed(refs)), latents)
    _, frames = rollout(["a man walks"], [refs], height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, max_sequence_length=SEQ, latents=latents, sde_steps=[])
    assert frames.dtype == torch.uint8 and frames.shape == (1, FRAMES, H, W, 3)
    # Our frames are rounded to uint8: at most half a grey level from diffusers' float frames.
    assert (frames.float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-4


def test_reference_order_is_input_order(rollout):
    red, blue = faces()[:2]
    both = rollout.encode_conditioning([[red, blue]], H, W, FRAMES)
    red_only = rollout.encode_conditioning([[red]], H, W, FRAMES)
    blue_only = rollout.encode_conditioning([[blue]], H, W, FRAMES)
    z = rollout.z_dim
    # Time axis: [refs in input order, video frames]; channels: [inactive, reactive, mask].
    assert torch.allclose(both[:, :z, 0], red_only[:, :z, 0], atol=1e-5)
    assert torch.allclose(both[:, :z, 1], blue_only[:, :z, 0], atol=1e-5)
    assert not torch.allclose(both[:, :z, 0], both[:, :z, 1], atol=1e-2)
    assert torch.count_nonzero(both[:, z : 2 * z, :2]) == 0  # references have no reactive part
    assert torch.count_nonzero(both[:, 2 * z :, :2]) == 0 and bool((both[:, 2 * z :, 2:] == 1).all())


def test_batch_equals_single_items(rollout):
    refs = [faces()[:2], faces()[2:4]]
    prompts = ["a man walks", "two people talk"]
    latents = rollout.prepare_latents(2, H, W, FRAMES, 2, torch.Generator().manual_seed(5))
    _, batch_frames = rollout(prompts, refs, height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, max_sequence_length=SEQ, latents=latents, sde_steps=[])
    for i in range(2):
        _, single = rollout([prompts[i]], [refs[i]], height=H, width=W, num_frames=FRAMES,
                            num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=SEQ,
                            latents=latents[i : i + 1], sde_steps=[])
        assert (single[0].int() - batch_frames[i].int()).abs().max() <= 1


@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo", "cps"])
@pytest.mark.parametrize("num_refs", [1, 4])
def test_rescoring_gives_ratio_one(rollout, schedule, num_refs):
    sde = SDEConfig(schedule=schedule, noise_level=0.7)
    refs = [faces()[:num_refs]] * 3
    rollouts, _ = rollout(["a man walks", "a woman smiles", "two people"], refs, height=H, width=W,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          max_sequence_length=SEQ, sde=sde, sde_steps=[0, 1, 2],
                          generator=torch.Generator().manual_seed(0), group_ids=[7, 7, 8])
    assert rollouts.log_probs.shape == (3, 3)
    assert rollouts.latents.shape[:2] == (3, 3) and rollouts.latents.shape[3] == 2 + num_refs
    assert rollouts.group_ids.tolist() == [7, 7, 8]
    assert torch.equal(rollouts.step_indices, torch.tensor([0, 1, 2]))
    # The state after step s is the state before step s + 1 (no step is skipped or reordered).
    assert torch.equal(rollouts.next_latents[:, 0], rollouts.latents[:, 1])
    for step in range(rollouts.num_steps):
        out = rollout.rescore(rollouts, step, guidance_scale=GUIDANCE, sde=sde)
        ratio = torch.exp(out.log_prob - rollouts.log_probs[:, step])
        assert (ratio - 1).abs().max() < 1e-5


def test_bf16_rescoring_under_training_autocast_gives_ratio_one():
    """bf16 weights with an fp32 LoRA (the mixed-precision training setup): sampled with no
    autocast around the call, re-scored inside the training step's autocast, the log-probs
    agree exactly (the pipeline autocasts its own transformer calls)."""
    from config.dgx import tiny
    from identity_grpo.models import add_lora

    pipe = build_tiny_vace_pipeline(seed=0).to(torch.bfloat16)
    bf16 = VaceRolloutPipeline(pipe, dtype=torch.bfloat16)
    bf16.transformer = add_lora(pipe.transformer, tiny())
    randomize_lora_b(bf16.transformer, std=0.05, seed=1)  # a trained adapter, so the fp32 LoRA path matters
    rollouts, _ = bf16(["a man walks", "a woman smiles"], [faces()[:1]] * 2, height=H, width=W, num_frames=FRAMES,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=SEQ,
                       sde_steps=[0, 1], generator=torch.Generator().manual_seed(0))
    for step in range(rollouts.num_steps):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = bf16.rescore(rollouts, step, guidance_scale=GUIDANCE, sde=SDEConfig())
        assert torch.equal(out.log_prob, rollouts.log_probs[:, step])


def test_sde_steps_select_which_steps_are_stochastic(rollout):
    refs = [faces()[:1]]
    latents = rollout.prepare_latents(1, H, W, FRAMES, 1, torch.Generator().manual_seed(1))
    kwargs = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  max_sequence_length=SEQ, latents=latents)
    ode, ode_frames = rollout(["a man"], refs, sde_steps=[], **kwargs)
    assert ode.num_steps == 0 and ode.log_probs.numel() == 0
    window, window_frames = rollout(["a man"], refs, sde_steps=[1, 2], generator=torch.Generator().manual_seed(2),
                                    **kwargs)
    assert window.step_indices.tolist() == [1, 2]
    # Before the first SDE step the trajectory is the ODE one: the recorded state at step 1 is
    # exactly one Euler step from the initial noise.
    sigmas = rollout.schedule(STEPS)[1]
    assert window.sigmas.tolist() == pytest.approx(sigmas[1:3].tolist())
    assert not torch.equal(window_frames, ode_frames)


def test_mixed_reference_counts_rejected(rollout):
    with pytest.raises(ValueError, match="one reference count"):
        rollout(["a", "b"], [faces()[:1], faces()[:2]], height=H, width=W, num_frames=FRAMES,
                num_inference_steps=2, guidance_scale=GUIDANCE, max_sequence_length=SEQ)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(height=30), "divisible by 16"), (dict(num_frames=6), "4k \\+ 1")],
)
def test_bad_sizes_rejected(rollout, kwargs, message):
    args = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=2, guidance_scale=GUIDANCE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rollout(["a"], [faces()[:1]], **args)


def test_five_references_rejected(rollout):
    with pytest.raises(ValueError, match="1-4 reference"):
        rollout(["a"], [faces() + faces()[:1]], height=H, width=W, num_frames=FRAMES, num_inference_steps=2,
                guidance_scale=GUIDANCE)


def test_frames_to_uint8_rounds_and_clamps():
    video = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 6, 1, 1).expand(1, 3, 6, 1, 1)
    frames = frames_to_uint8(video)
    assert frames.shape == (1, 6, 1, 1, 3)
    # (x / 2 + 0.5) * 255, rounded: 0, 0, 127.5 -> 128, 191.25 -> 191, 255, 255
    assert frames[0, :, 0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_saved_tiny_model_loads_through_from_pretrained(tiny_vace_dir):
    from config.dgx import tiny
    from identity_grpo.models import load_vace_pipeline

    config = tiny()
    config.pretrained.model = str(tiny_vace_dir)
    loaded = load_vace_pipeline(config, torch.device("cpu"), torch.float32)
    fresh = build_tiny_vace_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(fresh, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not any(p.requires_grad for p in loaded.transformer.parameters())


def test_shared_prefix_equals_full_rollout_with_fewer_calls(rollout):
    refs = [faces()[:1]] * 4
    prompts = ["a man walks"] * 2 + ["a woman smiles"] * 2
    group_ids = [3, 3, 9, 9]
    noise = rollout.prepare_latents(2, H, W, FRAMES, 1, torch.Generator().manual_seed(4))
    latents = noise[[0, 0, 1, 1]]
    calls = []
    hook = rollout.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        kwargs = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      max_sequence_length=SEQ, sde_steps=[2, 3], group_ids=group_ids)
        full, full_frames = rollout(prompts, refs, latents=latents, generator=torch.Generator().manual_seed(1),
                                    **kwargs)
        full_calls = list(calls)
        calls.clear()
        fast, fast_frames = rollout(prompts, refs, latents=latents, generator=torch.Generator().manual_seed(1),
                                    shared_prefix=True, **kwargs)
    finally:
        hook.remove()
    # One stacked CFG call per step (2 x batch); the 2-step ODE prefix runs on 2 groups, not 4.
    assert full_calls == [8, 8, 8, 8]
    assert calls == [4, 4, 8, 8]
    assert torch.allclose(full.latents, fast.latents, atol=1e-5)
    assert torch.allclose(full.log_probs, fast.log_probs, atol=1e-4)
    assert (full_frames.int() - fast_frames.int()).abs().max() <= 1
    assert torch.equal(fast.latents[0, 0], fast.latents[1, 0])
    with pytest.raises(ValueError, match="identical initial latents"):
        rollout(prompts, refs, latents=rollout.prepare_latents(4, H, W, FRAMES, 1), shared_prefix=True, **kwargs)


def test_shared_reference_objects_are_encoded_once(rollout):
    red, blue = faces()[:2]
    encoded = []
    hook = rollout.vae.encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        shared = rollout.encode_conditioning([[red, blue]] * 3, H, W, FRAMES)
        encoded_shared = list(encoded)
        encoded.clear()
        copies = [[red.copy(), blue.copy()] for _ in range(3)]
        separate = rollout.encode_conditioning(copies, H, W, FRAMES)
    finally:
        hook.remove()
    assert torch.allclose(shared, separate, atol=1e-6)
    assert sum(encoded_shared) < sum(encoded)  # 2 reference images encoded instead of 6
