"""The Phantom presets, and the tiny Phantom checkpoint through the train loop's own pieces."""

from pathlib import Path

import pytest
import torch

from identity_grpo.advantages import group_advantages
from identity_grpo.data import ReferenceVideoDataset
from identity_grpo.grpo import grpo_loss
from identity_grpo.loop import rollout_rows, sde_config, seeded_generator
from identity_grpo.models import add_lora
from identity_grpo.pipelines.phantom import PhantomRolloutPipeline, load_phantom_pipeline
from identity_grpo.sde import gaussian_kl
from identity_grpo.testing import build_tiny_phantom_dit, load_preset

ROOT = Path(__file__).resolve().parents[1]


preset = load_preset


def test_phantom_preset_has_phantoms_defaults():
    config, vace = preset("phantom"), preset("vace")
    assert config.model_type == "phantom"
    assert config.pretrained.model == "Wan-AI/Wan2.1-T2V-1.3B-diffusers"
    assert config.pretrained.phantom_dit.endswith(".pth")
    assert (config.sample.image_guidance_scale, config.sample.text_guidance_scale) == (5.0, 7.5)
    assert config.sample.guidance_scale == config.sample.text_guidance_scale
    assert config.sample.flow_shift == 5.0
    assert (config.eval_height, config.eval_width, config.eval_frames, config.sample.eval_num_steps) == (480, 832, 81, 50)
    # Training-time size, steps and GRPO hyper-parameters are the VACE preset's.
    for key in ("height", "width", "frames"):
        assert config[key] == vace[key]
    assert config.sample.num_steps == vace.sample.num_steps and config.train.to_dict() == vace.train.to_dict()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    config = preset("phantom_tiny")
    folder = tmp_path_factory.mktemp("models") / "wan_t2v_phantom"
    config.pretrained.model = str(folder)
    config.pretrained.phantom_dit = str(folder / "phantom_dit.pth")
    config.dataset = str(ROOT / "dataset" / "generated_img")
    return config


def test_guidance_scale_must_match_text_scale(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.sample.guidance_scale = 4.5
    with pytest.raises(ValueError, match="sample.text_guidance_scale"):
        load_phantom_pipeline(config, torch.device("cpu"), torch.float32)


def test_tiny_phantom_samples_scores_and_updates_like_vace(tiny_config):
    config = tiny_config
    config.train.learning_rate = 1e-2
    pipeline = load_phantom_pipeline(config, torch.device("cpu"), torch.float32)
    assert isinstance(pipeline, PhantomRolloutPipeline)
    assert (pipeline.image_guidance_scale, pipeline.text_guidance_scale) == (5.0, 7.5)
    # The DiT comes from the converted .pth, not from the base folder's T2V transformer.
    expected = build_tiny_phantom_dit(seed=1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipeline.transformer.state_dict().items())
    # sample.flow_shift = 5 replaces the folder's shift 3: sigma = 5 s / (1 + 4 s) of the unshifted
    # s = linspace(1, 5 * 0.001 / (1 + 4 * 0.001), 4), whose second entry is 0.668327.
    s = 1 - (1 - 5 * 0.001 / 1.004) / 3
    assert abs(float(pipeline.schedule(4)[1][1]) - 5 * s / (1 + 4 * s)) < 1e-6

    # As the train script wires it: LoRA on the transformer, then rollouts through loop.rollout_rows.
    transformer = add_lora(pipeline.transformer, config)
    pipeline.transformer = transformer
    dataset = ReferenceVideoDataset(config.dataset, "train")
    indices = [0, 0, 1, 1]
    rollouts, inputs = rollout_rows(pipeline, dataset, indices, config, generator=seeded_generator(0, "t"),
                                    group_ids=[0, 0, 1, 1])
    assert inputs.frames.shape == (4, config.frames, config.height, config.width, 3)
    assert rollouts.num_steps == 3 and rollouts.conditioning.shape[2] == len(dataset[0].reference_paths)
    # Any reward of the frames; group-normalised advantages; the clipped loss with the KL term.
    rewards = inputs.frames.float().mean(dim=(1, 2, 3, 4))
    advantages, _ = group_advantages(rewards, rollouts.group_ids)
    optimizer = torch.optim.SGD([p for p in transformer.parameters() if p.requires_grad], lr=1.0)
    sde = sde_config(config)
    out = pipeline.rescore(rollouts, 0, guidance_scale=config.sample.guidance_scale, sde=sde, transformer=transformer)
    with torch.no_grad(), transformer.disable_adapter():
        reference = pipeline.rescore(rollouts, 0, guidance_scale=config.sample.guidance_scale, sde=sde,
                                     transformer=transformer)
    kl = gaussian_kl(out.prev_sample_mean, reference.prev_sample_mean, out.std)
    assert float(kl.detach().abs().max()) == 0.0  # fresh LoRA (lora_B = 0) is the base model
    loss, stats = grpo_loss(out.log_prob, rollouts.log_probs[:, 0], advantages, clip_range=0.2, kl=kl, beta=0.01)
    assert abs(float(stats["ratio"]) - 1) < 1e-5 and float(stats["clipfrac"]) == 0.0
    loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.requires_grad and p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    optimizer.step()
    after = pipeline.rescore(rollouts, 0, guidance_scale=config.sample.guidance_scale, sde=sde, transformer=transformer)
    assert float((after.log_prob - out.log_prob).detach().abs().max()) > 1e-7  # the update moved the policy
