"""EvoID's anchors by hand, and its text-to-video teacher: Wan2.1-VACE with its context switched
off is exactly the Wan2.1 T2V transformer with the same base weights; a teacher folder
(``pretrained.teacher``; Phantom's default, the T2V transformer of its base folder) is loaded,
checked and used by the train step's anchor."""

from pathlib import Path

import pytest
import torch

from identity_grpo.evoid import anchor_losses
from identity_grpo.testing import load_preset

ROOT = Path(__file__).resolve().parents[1]
# WanVACETransformer3DModel's config fields that a WanTransformer3DModel shares.
T2V_FIELDS = ["patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len"]


def t2v_from_vace(vace):
    """A ``WanTransformer3DModel`` holding exactly VACE's base (non-``vace_``) weights."""
    from diffusers import WanTransformer3DModel

    t2v = WanTransformer3DModel(**{k: vace.config[k] for k in T2V_FIELDS}).eval()
    t2v.load_state_dict({k: v for k, v in vace.state_dict().items() if not k.startswith("vace_")}, strict=True)
    return t2v


def test_anchor_losses_by_hand():
    # (B, C, T, h, w) = (1, 1, 3, 1, 1): one reference slot (frame 0), two video frames.
    v_evo = torch.tensor([0.5, 1.0, -1.0]).view(1, 1, 3, 1, 1).requires_grad_(True)
    v_t2v = torch.tensor([0.0, -1.0]).view(1, 1, 2, 1, 1)   # on the video frames only
    v_init = torch.tensor([0.5, 0.0, 0.0]).view(1, 1, 3, 1, 1)
    loss, stats = anchor_losses(v_evo, v_t2v, v_init, video_frames=slice(1, None), lambda_t2v=0.01, lambda_self=0.2)
    # t2v: mean((1 - 0)^2, (-1 + 1)^2) = 0.5; self: mean(0, 1, 1) = 2/3; loss = 0.005 + 0.1333
    assert stats["t2v_anchor"].item() == pytest.approx(0.5)
    assert stats["self_anchor"].item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(0.01 * 0.5 + 0.2 * 2 / 3, abs=1e-7)
    loss.backward()
    # d/dv_evo: t2v on video frames 0.01 * 2 (v - t) / 2, self 0.2 * 2 (v - i) / 3
    expected = torch.tensor([0.0, 0.01 * 1.0 + 0.4 / 3, 0.0 + 0.4 / 3 * -1.0]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(v_evo.grad, expected, rtol=1e-5, atol=1e-7)


def test_vace_with_its_context_off_is_the_t2v_transformer():
    from identity_grpo.testing import build_vace_transformer

    vace = build_vace_transformer()
    t2v = t2v_from_vace(vace)  # load_state_dict(strict=True) raises unless the parameters are the same
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 2, 4, 4, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    control = torch.randn(2, 72, 2, 4, 4, generator=generator)
    timestep = torch.tensor([500, 200])
    with torch.no_grad():
        off = vace(hidden_states=video, timestep=timestep, encoder_hidden_states=text, control_hidden_states=control,
                   control_hidden_states_scale=torch.zeros(2), return_dict=False)[0]
        on = vace(hidden_states=video, timestep=timestep, encoder_hidden_states=text, control_hidden_states=control,
                  control_hidden_states_scale=torch.ones(2), return_dict=False)[0]
        plain = t2v(hidden_states=video, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(off, plain)
    assert not torch.allclose(on, plain)


def evoid_config(preset, model, **pretrained):
    config = load_preset(preset)
    config.algorithm = "evoid"
    config.pretrained.model = str(model)
    config.pretrained.update(pretrained)
    config.dataset = str(ROOT / "dataset" / "generated_img")
    return config


def test_a_vace_teacher_folder_with_the_base_weights_equals_the_context_off_teacher(tiny_vace_dir, tmp_path):
    from identity_grpo.models import load_rollout_pipeline

    cpu = torch.device("cpu")
    builtin = load_rollout_pipeline(evoid_config("tiny", tiny_vace_dir), cpu, torch.float32)
    assert builtin.teacher is None  # VACE's own base with its context off
    t2v_from_vace(builtin.transformer).save_pretrained(tmp_path / "t2v" / "transformer")
    folder = load_rollout_pipeline(evoid_config("tiny", tiny_vace_dir, teacher=str(tmp_path / "t2v")), cpu,
                                   torch.float32)
    assert folder.teacher is not None
    generator = torch.Generator().manual_seed(0)
    # (B, C, n + F, h, w) with 1 reference slot; the conditioning's channels are VACE's control channels.
    state = torch.randn(2, builtin.z_dim, 3, 8, 8, generator=generator)
    control = torch.randn(2, builtin.transformer.config.vace_in_channels, 3, 8, 8, generator=generator)
    text = torch.randn(2, 16, builtin.transformer.config.text_dim, generator=generator)
    timestep = torch.tensor([700, 300])
    with torch.no_grad():
        context_off = builtin.text_to_video_velocity(state, timestep, text, control, 1, transformer=builtin.transformer)
        loaded = folder.text_to_video_velocity(state, timestep, text, control, 1)
        context_on = builtin.guided_velocity(state, timestep, text, None, control, 1.0, 1.0)
    assert context_off.shape == (2, builtin.z_dim, 2, 8, 8)  # the video frames only
    torch.testing.assert_close(loaded, context_off, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(context_on[:, :, 1:], context_off, atol=1e-3)


def test_a_teacher_of_another_size_is_refused_naming_the_field(tiny_vace_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    from identity_grpo.models import load_rollout_pipeline

    config = evoid_config("tiny", tiny_vace_dir, teacher=str(tmp_path / "wide"))
    vace = load_rollout_pipeline(evoid_config("tiny", tiny_vace_dir), torch.device("cpu"), torch.float32).transformer
    sizes = {k: vace.config[k] for k in T2V_FIELDS} | {"text_dim": vace.config.text_dim * 2}
    WanTransformer3DModel(**sizes).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"pretrained.teacher = .*wide.* text_dim"):
        load_rollout_pipeline(config, torch.device("cpu"), torch.float32)
    from identity_grpo.configuration import validate_config

    config = evoid_config("tiny_evoid", tiny_vace_dir, teacher=str(tmp_path / "nothing_here"))
    validate_config(config)  # the files are only checked on request (the train script does)
    with pytest.raises(ValueError, match=r"pretrained.teacher = .*nothing_here.* does not exist"):
        validate_config(config, check_files=True)
    (tmp_path / "empty").mkdir()
    config.pretrained.teacher = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"pretrained.teacher = .*empty.* holds neither config.json"):
        validate_config(config, check_files=True)


def test_phantoms_teacher_is_its_base_folders_t2v_transformer_in_the_train_step(tmp_path):
    """EvoID on Phantom: the teacher is the T2V transformer of ``pretrained.model`` (not Phantom's
    DiT), and ``train_wan2_1_vace.nft_step_loss``'s T2V anchor is the squared distance between the
    trained Phantom velocity and that teacher's, computed here by hand."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import train_wan2_1_vace as script
    from identity_grpo.data import ReferenceVideoDataset
    from identity_grpo.loop import rollout_rows, seeded_generator
    from identity_grpo.models import add_lora, load_rollout_pipeline
    from identity_grpo.old_policy import add_old_policy
    from identity_grpo.testing import build_tiny_t2v_pipeline, randomize_lora_b

    folder = tmp_path / "tiny_models" / "wan_t2v_phantom"
    config = evoid_config("phantom_tiny", folder, phantom_dit=str(folder / "phantom_dit.pth"))
    config.sample.guidance_scale = config.sample.text_guidance_scale = 1.0  # CFG-free, as nft collects
    config.evoid.lambda_t2v, config.evoid.lambda_self, config.train.beta = 1.0, 0.0, 0.0
    pipeline = load_rollout_pipeline(config, torch.device("cpu"), torch.float32)
    t2v = build_tiny_t2v_pipeline(seed=0).transformer.state_dict()
    assert all(torch.equal(v, t2v[k]) for k, v in pipeline.teacher.state_dict().items())
    assert not all(torch.equal(v, t2v[k]) for k, v in pipeline.transformer.state_dict().items())

    pipeline.transformer = add_lora(pipeline.transformer, config)
    randomize_lora_b(pipeline.transformer, std=0.05, seed=1)
    dataset = ReferenceVideoDataset(config.dataset, "train")
    rollouts, _ = rollout_rows(pipeline, dataset, [0, 1], config, generator=seeded_generator(0, "t"),
                               group_ids=[0, 1], evaluation=True)
    add_old_policy(pipeline.transformer)
    timestep = torch.tensor([800, 400])
    noise = torch.randn(rollouts.final_latents.shape, generator=torch.Generator().manual_seed(2))
    accelerator = Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    _, stats = script.nft_step_loss(config, accelerator, pipeline, pipeline.transformer, rollouts,
                                    torch.tensor([1.0, -1.0]), timestep, noise)

    t = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - t) * rollouts.final_latents + t * noise
    with torch.no_grad():
        v_evo = pipeline.guided_velocity(x_t, timestep, rollouts.prompt_embeds, None, rollouts.conditioning, 1.0)
        v_teacher = pipeline.teacher(hidden_states=x_t, timestep=timestep, encoder_hidden_states=rollouts.prompt_embeds,
                                     return_dict=False)[0]
    by_hand = ((v_evo - v_teacher) ** 2).mean()
    assert by_hand > 1e-4
    torch.testing.assert_close(stats["t2v_anchor"], by_hand, rtol=1e-5, atol=1e-7)
