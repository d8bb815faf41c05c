"""DiffusionNFT through the train script: deterministic CFG-free collection by the old adapter,
the old adapter's EMA, checkpoints with both adapters and exact resume."""


import pytest
import torch
from safetensors.torch import load_file

from config.dgx import get_config
from identity_grpo.configuration import num_train_steps, sde_step_indices, trained_step_indices, validate_config


def test_presets_follow_diffusionnft():
    config = get_config("vace_nft")
    validate_config(config, num_processes=8)
    assert config.algorithm == "nft" and config.sample.num_steps == 10 and config.sample.guidance_scale == 1.0
    assert num_train_steps(config) == 9  # floor(10 * 0.99), the sampler's timesteps shuffled
    assert sde_step_indices(config, 0) == [] and trained_step_indices(config, 0) == []  # nothing stochastic
    assert (config.nft.beta, config.nft.old_policy_decay_type, config.train.beta) == (1.0, 1, 1e-4)
    validate_config(get_config("phantom_nft"), num_processes=8)
    evoid = get_config("vace_evoid")
    validate_config(evoid, num_processes=8)
    assert (evoid.algorithm, evoid.evoid.lambda_t2v, evoid.evoid.lambda_self) == ("evoid", 0.01, 0.2)
    phantom = get_config("phantom_evoid")
    validate_config(phantom, num_processes=8)
    assert (phantom.algorithm, phantom.model_type, phantom.evoid.lambda_t2v, phantom.evoid.lambda_self) == (
        "evoid", "phantom", 0.01, 0.2)
    assert phantom.pretrained.teacher == ""  # the T2V transformer of pretrained.model (Wan2.1-T2V-1.3B)


def test_grpo_only_settings_are_refused_for_nft():
    config = get_config("tiny_nft")
    config.sample.sde_window_size = 2
    with pytest.raises(ValueError, match="GRPO settings"):
        validate_config(config)
    config = get_config("tiny_nft")
    config.nft.num_timesteps = 9  # the sampler has 4 timesteps
    with pytest.raises(ValueError, match="nft.num_timesteps"):
        validate_config(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_subprocess):
    tmp = tmp_path_factory.mktemp("nft")

    def run(logdir, *overrides, run_dir=None):
        return train_subprocess("tiny_nft", logdir, "--config.nft.num_timesteps=2", *overrides, run_dir=run_dir)

    straight = run(tmp / "straight", "--config.num_epochs=3", "--config.save_freq=1")
    halted = run(tmp / "halted", "--config.num_epochs=2", "--config.save_freq=1")
    run(tmp / "unused", "--config.num_epochs=3", "--config.save_freq=1", f"--config.resume_from={halted}",
        run_dir=halted)
    return straight, halted


def test_resume_is_exact_with_both_adapters(runs):
    straight, resumed = runs
    for name in ("lora/adapter_model.safetensors", "ema/lora/adapter_model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    old_a = torch.load(straight / "checkpoints" / "checkpoint-000003" / "old_policy.pt", weights_only=True)
    old_b = torch.load(resumed / "checkpoints" / "checkpoint-000003" / "old_policy.pt", weights_only=True)
    assert old_a.keys() == old_b.keys() and all(torch.equal(old_a[k], old_b[k]) for k in old_a)


def test_old_policy_is_an_ema_of_the_trained_adapter(runs):
    straight, _ = runs
    # Saved LoRA: the trained adapter only (peft would write the old one into a subfolder).
    assert not (straight / "lora" / "old").exists()
    checkpoint = straight / "checkpoints" / "checkpoint-000001"
    trained = load_file(checkpoint / "lora" / "adapter_model.safetensors")
    old = torch.load(checkpoint / "old_policy.pt", weights_only=True)
    assert old.keys() == trained.keys()
    lora_b = [k for k in trained if "lora_B" in k]
    assert any(trained[k].abs().max() > 0 for k in lora_b)  # training moved the adapter
    # Epoch 0: 2 timesteps x 1 batch = one optimizer step, then decay min(0.001 * 1, 0.5) = 0.001:
    # old = 0.001 * initial + 0.999 * trained, and lora_B starts at 0, so old lora_B = 0.999 * trained lora_B.
    for key in lora_b:
        torch.testing.assert_close(old[key], 0.999 * trained[key], rtol=1e-5, atol=1e-9)
