"""The KL reference is the frozen base model: LoRA disabled equals no LoRA at all."""

import pytest
import torch
from PIL import Image

from config.dgx import tiny
from identity_grpo.models import add_lora
from identity_grpo.pipelines.vace import SDEConfig, VaceRolloutPipeline
from identity_grpo.sde import gaussian_kl
from identity_grpo.testing import build_tiny_vace_pipeline, randomize_lora_b


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_vace_pipeline(seed=0)
    base = VaceRolloutPipeline(build_tiny_vace_pipeline(seed=0))  # identical weights, never adapted
    rollout = VaceRolloutPipeline(pipe)
    rollout.transformer = add_lora(pipe.transformer, tiny())
    refs = [[Image.new("RGB", (32, 32), (200, 80, 60))]] * 2
    rollouts, _ = rollout(["a man walks", "a woman smiles"], refs, height=32, width=32, num_frames=5,
                          num_inference_steps=3, guidance_scale=4.5, max_sequence_length=16,
                          generator=torch.Generator().manual_seed(0), sde_steps=[0, 1])
    return rollout, base, rollouts


def rescore(pipeline, rollouts, step, transformer=None):
    return pipeline.rescore(rollouts, step, guidance_scale=4.5, sde=SDEConfig(), transformer=transformer)


def test_fresh_lora_has_zero_kl_and_unit_ratio(setup):
    rollout, _, rollouts = setup
    policy = rescore(rollout, rollouts, 1)
    with rollout.transformer.disable_adapter():
        reference = rescore(rollout, rollouts, 1)
    assert torch.equal(policy.prev_sample_mean, reference.prev_sample_mean)  # lora_B starts at 0
    assert gaussian_kl(policy.prev_sample_mean, reference.prev_sample_mean, policy.std).abs().max() == 0


def test_disabled_adapter_is_the_base_model_after_training(setup):
    rollout, base, rollouts = setup
    randomize_lora_b(rollout.transformer, std=0.05, seed=1)
    policy = rescore(rollout, rollouts, 0)
    with rollout.transformer.disable_adapter():
        reference = rescore(rollout, rollouts, 0)
    untouched = rescore(base, rollouts, 0)
    assert torch.allclose(reference.prev_sample_mean, untouched.prev_sample_mean, atol=1e-6)
    kl = gaussian_kl(policy.prev_sample_mean, reference.prev_sample_mean, policy.std)
    by_hand = ((policy.prev_sample_mean - reference.prev_sample_mean) ** 2 / (2 * policy.std**2)).mean(dim=(1, 2, 3, 4))
    assert bool((kl > 0).all()) and torch.allclose(kl, by_hand)
    # The adapter is back on after the context: the policy differs from the base again.
    assert not torch.allclose(rescore(rollout, rollouts, 0).prev_sample_mean, untouched.prev_sample_mean, atol=1e-4)


def test_train_step_loss_penalises_kl_to_the_untouched_base(setup):
    """``train_wan2_1_vace.step_loss`` == the GRPO loss with the KL to a never-adapted copy of
    the model, computed here by hand; beta scales exactly that KL."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import train_wan2_1_vace as script
    from identity_grpo.grpo import grpo_loss
    from identity_grpo.loop import sde_config

    rollout, base, rollouts = setup
    randomize_lora_b(rollout.transformer, std=0.05, seed=1)
    config = tiny()
    config.sample.guidance_scale, config.train.beta = 4.5, 0.5
    advantages = torch.tensor([1.0, -1.0])
    accelerator = Accelerator(cpu=True)
    AcceleratorState._reset_state(True)  # leave no process-wide accelerate state to later tests
    loss, _ = script.step_loss(config, accelerator, rollout, rollout.transformer, rollouts, advantages, 0)

    sde = sde_config(config)
    policy = rollout.rescore(rollouts, 0, guidance_scale=4.5, sde=sde, transformer=rollout.transformer)
    untouched = base.rescore(rollouts, 0, guidance_scale=4.5, sde=sde)
    kl = gaussian_kl(policy.prev_sample_mean, untouched.prev_sample_mean, policy.std)
    expected, _ = grpo_loss(policy.log_prob, rollouts.log_probs[:, 0], advantages,
                            clip_range=config.train.clip_range, kl=kl, beta=0.5)
    assert float(kl.detach().mean()) > 1e-4
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    config.train.beta = 0.0
    without_kl, _ = script.step_loss(config, accelerator, rollout, rollout.transformer, rollouts, advantages, 0)
    assert torch.allclose(loss - without_kl, 0.5 * kl.mean(), rtol=1e-4, atol=1e-7)
    loss.backward()  # gradients reach the adapter only
    grads = {name: p.grad for name, p in rollout.transformer.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
