"""The `vace` preset reproduces upstream Identity-GRPO (alibaba/identity-grpo) row by row.

Each test pins one difference that used to change a `vace` run (docs/upstream.md lists them all,
with the setting that restores the project's earlier choice).
"""

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from config.dgx import get_config, tiny
from identity_grpo.advantages import update_mask
from identity_grpo.data import ReferenceVideoDataset
from identity_grpo.ema import ema_repeats, ema_update
from identity_grpo.loop import rollout_rows, seeded_generator
from identity_grpo.models import add_lora
from identity_grpo.pipelines.vace import VaceRolloutPipeline
from identity_grpo.testing import build_tiny_vace_pipeline

# sha256 of the negative prompt literal in upstream train_wan2_1_vace.py (Wan2.1's standard one).
UPSTREAM_NEGATIVE_PROMPT_SHA256 = "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"


@pytest.mark.parametrize("preset", ["vace", "phantom"])
def test_preset_uses_wans_negative_prompt(preset):
    negative = get_config(preset).sample.negative_prompt
    assert hashlib.sha256(negative.encode()).hexdigest() == UPSTREAM_NEGATIVE_PROMPT_SHA256
    assert negative.startswith("色调艳丽，过曝") and negative.endswith("倒着走")


def test_negative_prompt_reaches_sampling_and_training(dataset_dir):
    """The rollout record holds the configured negative prompt's embedding; re-scoring (training)
    reads it from there, so both use the same text."""
    config = tiny()
    config.dataset = str(dataset_dir)
    pipeline = VaceRolloutPipeline(build_tiny_vace_pipeline(seed=0))
    dataset = ReferenceVideoDataset(config.dataset, "train")
    embeds = {}
    for negative in ("", "blurry, static"):
        config.sample.negative_prompt = negative
        rollouts, _ = rollout_rows(pipeline, dataset, [0, 0], config, generator=seeded_generator(0, "n"))
        embeds[negative] = rollouts.negative_prompt_embeds
        assert torch.equal(embeds[negative], pipeline.encode_prompts([negative], config.sample.max_sequence_length))
    assert not torch.equal(embeds[""], embeds["blurry, static"])


def test_preset_lora_scale_is_one():
    config = get_config("vace")
    assert (config.train.lora_rank, config.train.lora_alpha) == (32, 32)
    peft_model = add_lora(build_tiny_vace_pipeline(seed=0).transformer, config)
    scalings = {layer.scaling["default"] for layer in peft_model.modules() if hasattr(layer, "scaling")
                and "default" in getattr(layer, "scaling", {})}
    assert scalings == {1.0}


def test_every_step_is_stochastic_and_the_last_is_not_trained(dataset_dir):
    """Upstream: 25 SDE steps, the first 24 recorded. Same noise draws for the recorded steps as the
    'ode' option; only the untrained final step differs (stochastic vs deterministic)."""
    config = tiny()  # 4 steps, timestep_fraction 0.99 -> 3 trained
    config.dataset = str(dataset_dir)
    dataset = ReferenceVideoDataset(config.dataset, "train")
    pipeline = VaceRolloutPipeline(build_tiny_vace_pipeline(seed=0))
    results = {}
    for mode in ("sde", "ode"):
        config.sample.untrained_steps = mode
        results[mode] = rollout_rows(pipeline, dataset, [0, 0], config, generator=seeded_generator(0, "s"))
    (sde, sde_inputs), (ode, ode_inputs) = results["sde"], results["ode"]
    assert sde.step_indices.tolist() == ode.step_indices.tolist() == [0, 1, 2]
    assert torch.equal(sde.next_latents, ode.next_latents) and torch.equal(sde.log_probs, ode.log_probs)
    assert not torch.equal(sde_inputs.frames, ode_inputs.frames)  # the final step added noise


def test_zero_advantage_samples_are_dropped_per_sample():
    # Group A is constant (all 0); group B's middle sample sits exactly on its mean.
    advantages = torch.tensor([0.0, 0.0, 1.2247, 0.0, -1.2247])
    constant = torch.tensor([True, True, False, False, False])
    assert update_mask(advantages, constant, "sample").tolist() == [False, False, True, False, True]
    assert update_mask(advantages, constant, "group").tolist() == [False, False, True, True, True]
    assert update_mask(advantages, constant, "none").all()
    assert get_config("vace").train.filter_zero_advantage == "sample"


class _UpstreamEMA:
    """Upstream's EMAModuleWrapper rule, restated: called after every trained sampling batch with the
    optimizer step count ``n``; when (n + 1) % interval == 0, p_ema += (1 - min((1 + n) / (10 + n), decay)) (p - p_ema)."""

    def __init__(self, value, decay, interval):
        self.value, self.decay, self.interval = value, decay, interval

    def call(self, parameter, n):
        if (n + 1) % self.interval == 0:
            self.value += (1 - min((1 + n) / (10 + n), self.decay)) * (parameter - self.value)


def test_ema_schedule_equals_upstreams_per_batch_calls():
    from diffusers.training_utils import EMAModel

    config = get_config("vace")  # 8 sampling batches an epoch, 4 per optimizer step
    assert (config.train.ema_decay, config.train.ema_update_interval) == (0.9, 8)
    accumulation, batches = config.train.gradient_accumulation_steps, config.sample.num_batches_per_epoch
    parameter = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ours = EMAModel([parameter], decay=config.train.ema_decay)
    upstream = _UpstreamEMA(0.0, config.train.ema_decay, config.train.ema_update_interval)
    steps, applied = 0, 0
    for epoch in range(12):
        for batch in range(batches):
            if (batch + 1) % accumulation == 0:  # the optimizer steps after the batch's last backward pass
                with torch.no_grad():
                    parameter += 1.0 + 0.1 * steps  # any trajectory of the weights
                steps += 1
                applied += ema_update(ours, [parameter], steps, interval=config.train.ema_update_interval,
                                      repeats=ema_repeats(config.train))
            upstream.call(parameter.item(), steps)  # upstream: after every batch
    assert applied == 3  # after optimizer steps 7, 15 and 23
    assert ours.shadow_params[0].item() == pytest.approx(upstream.value, rel=1e-12)


def test_ema_default_is_one_update_per_optimizer_step():
    from diffusers.training_utils import EMAModel

    config = get_config("tiny")
    parameter = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = EMAModel([parameter], decay=0.99)
    expected = 0.0
    for step in range(1, 30):
        with torch.no_grad():
            parameter += 1.0
        assert ema_update(ema, [parameter], step, interval=1, repeats=ema_repeats(config.train))
        expected += (1 - min((1 + step) / (10 + step), 0.99)) * (float(parameter) - expected)
    assert ema.shadow_params[0].item() == pytest.approx(expected, rel=1e-12)


def test_reward_model_declares_upstreams_frame_rate():
    assert get_config("vace").reward_model.fps == 10.0  # diffusers' export_to_video default
    assert get_config("tiny").reward_model.fps == 10.0


@pytest.fixture(scope="module")
def identity_setup(tmp_path_factory):
    from vace_reward.testing import write_tiny_reward_model

    path = write_tiny_reward_model(tmp_path_factory.mktemp("reward") / "tiny")
    # Smooth frames (a codec keeps them close): a colour ramp that moves. Width 64: decord needs a multiple of 32.
    ramp = torch.linspace(0, 255, 64).view(1, 1, 1, 64, 1)
    frames = ((ramp + 8 * torch.arange(33).view(1, 33, 1, 1, 1)) % 256).expand(2, 33, 32, 64, 3).to(torch.uint8).clone()
    frames[1] = 255 - frames[1]
    refs = [[Image.new("RGB", (24, 24), (200, 80, 60))], [Image.new("RGB", (24, 24), (40, 90, 200))] * 2]
    return path, frames, refs


def test_identity_reward_scores_in_memory_at_10_fps_and_through_mp4(identity_setup):
    from identity_grpo.rewards import RewardInputs
    from identity_grpo.rewards.identity import identity, write_upstream_mp4
    from vace_reward.inference import IdentityRewardScorer

    path, frames, refs = identity_setup
    inputs = RewardInputs(frames=frames, reference_images=refs, prompts=["a man", "two women"])
    config = tiny()
    config.pretrained.reward_model = str(path)
    config.pretrained.build_tiny = False
    scorer = IdentityRewardScorer.from_pretrained(path)
    in_memory = identity(config, torch.device("cpu"))(inputs)["identity"]
    assert torch.equal(in_memory, scorer.score_frames(frames, refs, inputs.prompts, fps=10.0)[:, 0])
    assert not torch.equal(in_memory, scorer.score_frames(frames, refs, inputs.prompts, fps=16.0)[:, 0])

    config.reward_model.mp4_roundtrip = True
    via_mp4 = identity(config, torch.device("cpu"))(inputs)["identity"]
    with tempfile.TemporaryDirectory() as folder:
        videos = [str(write_upstream_mp4(video, Path(folder) / f"{i}.mp4", 10.0)) for i, video in enumerate(frames)]
        for i, images in enumerate(refs):
            for j, image in enumerate(images):
                image.save(Path(folder) / f"{i}_{j}.png")
        expected = scorer.score_videos(videos, [[str(Path(folder) / f"{i}_{j}.png") for j in range(len(images))]
                                                for i, images in enumerate(refs)], inputs.prompts)[:, 0]
    assert torch.equal(via_mp4, expected)
    assert not torch.equal(via_mp4, in_memory)  # the codec changes the pixels the model sees


def test_upstreams_uint8_conversion_truncates():
    from identity_grpo.pipelines.base import frames_to_uint8

    # (v + 1) * 127.5 for v = 0, 0.999, -0.999: 127.5, 254.87, 0.1275 -> truncated 127, 254, 0; rounded 128, 255, 0.
    video = torch.tensor([0.0, 0.999, -0.999, 1.5]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    assert frames_to_uint8(video, truncate=True)[0, :, 0, 0, 0].tolist() == [127, 254, 0, 255]
    assert frames_to_uint8(video)[0, :, 0, 0, 0].tolist() == [128, 255, 0, 255]
