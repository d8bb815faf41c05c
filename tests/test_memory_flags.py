"""Memory flags (``sample.store_dtype``, ``sample.offload_rollouts``, ``train.cache_prompt_embeds``,
``reward_model.offload``): each leaves the numbers as they were.

On a CPU-only machine "the accelerator" is the CPU, so moving to it is a no-op; these tests check
what can be checked there: tensors land on the device asked for (the ``meta`` device stands in for
a second device), the encoder is not called after caching, the reward models move at the right
moments, and a training run with every flag on gives bitwise the same LoRA as one without. How much
accelerator memory the flags free is docs/performance.md's "Memory plan".
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from config.dgx import get_config
from identity_grpo.pipelines.vace import SDEConfig, VaceRolloutPipeline
from identity_grpo.rewards import REGISTRY, CombinedReward, register
from identity_grpo.testing import build_tiny_vace_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a man walks in the park", "a woman smiles"]


def sample(pipeline, store_dtype=torch.float32, guidance_scale=4.5):
    refs = [[Image.new("RGB", (32, 32), (200, 80, 60))]] * 2
    return pipeline(PROMPTS, refs, height=32, width=32, num_frames=5, num_inference_steps=4,
                    guidance_scale=guidance_scale, max_sequence_length=16, sde=SDEConfig(noise_level=0.7),
                    generator=torch.Generator().manual_seed(0), record_steps=[0, 1, 2], store_dtype=store_dtype)


def log_ratios(pipeline, rollouts):
    return torch.stack([
        pipeline.rescore(rollouts, step, guidance_scale=4.5, sde=SDEConfig(noise_level=0.7)).log_prob
        - rollouts.log_probs[:, step]
        for step in range(rollouts.num_steps)
    ])


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_vace_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipeline(pipe):
    return VaceRolloutPipeline(pipe)


@pytest.fixture(scope="module")
def float32_rollouts(pipeline):
    return sample(pipeline)[0]


@pytest.mark.parametrize("store_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rollouts_rescore_to_a_ratio_of_exactly_one(pipeline, float32_rollouts, store_dtype):
    rollouts, _ = sample(pipeline, store_dtype)
    assert rollouts.latents.dtype == rollouts.next_latents.dtype == store_dtype
    assert rollouts.log_probs.dtype == torch.float32
    assert torch.equal(log_ratios(pipeline, rollouts), torch.zeros(3, 2))
    # The record's states take half the bytes of float32 ones.
    full = float32_rollouts
    state_bytes = full.latents.nbytes + full.next_latents.nbytes
    assert full.nbytes - rollouts.nbytes == state_bytes // 2


def test_casting_float32_rollouts_after_the_fact_breaks_the_ratio(pipeline, float32_rollouts):
    """The control: storing the float32 trajectory in bf16 without scoring the rounded values moves
    the log-ratio far off 0 (the rounding error is large next to the step's noise)."""
    assert torch.equal(log_ratios(pipeline, float32_rollouts), torch.zeros(3, 2))
    rollouts = float32_rollouts.select(torch.arange(2))
    rollouts.latents, rollouts.next_latents = rollouts.latents.bfloat16(), rollouts.next_latents.bfloat16()
    assert float(log_ratios(pipeline, rollouts).abs().max()) > 1e-4


def test_rollouts_move_to_the_requested_device_without_copying_in_place(float32_rollouts):
    rollouts = float32_rollouts
    on_meta = rollouts.to("meta")
    moved = [on_meta.latents, on_meta.next_latents, on_meta.log_probs, on_meta.timesteps, on_meta.sigmas,
             on_meta.sigmas_next, on_meta.conditioning, on_meta.prompt_embeds, on_meta.negative_prompt_embeds,
             on_meta.final_latents]
    assert all(t.device.type == "meta" for t in moved)
    assert on_meta.group_ids.device.type == "cpu"  # read by the advantage code on the CPU
    assert rollouts.latents.device.type == "cpu"  # the original record is untouched
    # Already there: the same tensors, no copy.
    again = rollouts.to("cpu")
    assert again.latents is rollouts.latents and again.conditioning is rollouts.conditioning


def test_cached_prompt_embeddings_equal_encoded_ones_and_the_encoder_is_not_called_again(pipe, float32_rollouts):
    cached = VaceRolloutPipeline(copy.deepcopy(pipe))
    assert cached.cache_prompt_embeds(PROMPTS + ["a man walks in the park", ""], 16, batch_size=2) == 3
    assert next(cached.pipe.text_encoder.parameters()).device.type == "cpu"
    calls = []
    cached.pipe.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    expected, (got, _) = float32_rollouts, sample(cached)
    assert calls == []
    for name in ("prompt_embeds", "negative_prompt_embeds", "latents", "next_latents", "log_probs"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    with pytest.raises(ValueError, match="were not encoded"):
        cached.encode_prompts(["a person"], 16)


class Recorder(torch.nn.Module):
    """A reward holding a module; logs where the module is at each call and each move."""

    events: list[str] = []

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, inputs):
        Recorder.events.append(f"score on {self.weight.device.type}")
        return {"recorder_for_tests": inputs.frames.float().mean(dim=(1, 2, 3, 4)) * self.weight.detach()}

    def to(self, device):
        # On a CPU-only machine the accelerator is the CPU too: the calls are told apart by the
        # argument, the accelerator's torch.device ("onto device") or the string "cpu" (parking).
        Recorder.events.append("onto device" if isinstance(device, torch.device) else f"to {device}")
        return super().to(device)


if "recorder_for_tests" not in REGISTRY:
    register("recorder_for_tests")(lambda config, device: Recorder().to(device))


def test_combined_reward_moves_only_rewards_that_can_move():
    Recorder.events = []
    module = Recorder()
    combined = CombinedReward({"recorder_for_tests": module, "plain": lambda inputs: {"plain": 0}},
                              {"recorder_for_tests": 1.0, "plain": 0.0})
    assert combined.to(torch.device("meta")) is combined
    assert module.weight.device.type == "meta" and Recorder.events == ["onto device"]


def tiny_run(tmp_path, tiny_vace_dir, name, **overrides):
    config = get_config("tiny")
    config.pretrained.model = str(tiny_vace_dir)
    config.dataset = str(ROOT / "dataset" / "generated_img")
    config.logdir = str(tmp_path / name)
    config.tracker, config.report = "", False
    config.num_epochs, config.eval_freq, config.log_videos_freq = 1, 0, 0
    config.reward_fn = {"ref_tone": 1.0, "recorder_for_tests": 0.0}
    config.sample.train_batch_size, config.sample.num_image_per_prompt = 2, 2
    config.sample.num_batches_per_epoch, config.train.gradient_accumulation_steps = 2, 1
    config.sample.test_batch_size = 4
    for dotted, value in overrides.items():
        section, leaf = dotted.split(".")
        config[section][leaf] = value
    import train_wan2_1_vace
    from accelerate.state import AcceleratorState

    try:
        summary = train_wan2_1_vace.train(config)
    finally:
        AcceleratorState._reset_state(True)  # leave no process-wide accelerate state to later tests
    run_dir = Path(summary["run_dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        record.pop("reward/recorder_for_tests/seconds", None)
        record.pop("reward/ref_tone/seconds", None)
    from safetensors.torch import load_file

    return summary, metrics, load_file(run_dir / "lora" / "adapter_model.safetensors")


def test_training_with_every_memory_flag_on_gives_the_same_lora(tmp_path, tiny_vace_dir):
    Recorder.events = []
    off = tiny_run(tmp_path, tiny_vace_dir, "off")
    assert "to cpu" not in Recorder.events
    Recorder.events = []
    on = tiny_run(tmp_path, tiny_vace_dir, "on", **{"sample.offload_rollouts": True, "train.cache_prompt_embeds": True,
                                                     "reward_model.offload": True})
    # Built on the device, parked on the CPU, on the device for sampling (2 batches) and the
    # final evaluation (1 batch), parked again after each.
    phases = [e for i, e in enumerate(Recorder.events) if i == 0 or e != Recorder.events[i - 1]]
    assert phases == ["onto device", "to cpu", "onto device", "score on cpu", "to cpu", "onto device", "score on cpu",
                      "to cpu"]
    assert Recorder.events[2:6] == ["onto device", "score on cpu", "score on cpu", "to cpu"]  # the 2 batches
    assert on[0]["lora_checksums"] == off[0]["lora_checksums"]
    assert on[1] == off[1] and on[0]["eval_after"] == off[0]["eval_after"]
    assert on[2].keys() == off[2].keys() and all(torch.equal(on[2][k], off[2][k]) for k in on[2])
    assert any(float(v.abs().max()) > 0 for k, v in on[2].items() if "lora_B" in k)  # it did train
