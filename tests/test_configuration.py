"""validate_config: each impossible setting names its field; presets are valid."""

import pytest

from config.dgx import get_config
from identity_grpo.configuration import num_train_steps, sde_step_indices, trained_step_indices, validate_config


@pytest.mark.parametrize("preset", ["vace", "tiny", "phantom", "phantom_tiny", "tiny_world", "tiny_world_nft",
                                    "tiny_world_evoid", "tiny_world_phantom", "tiny_world_reward",
                                    "tiny_world_phantom_nft", "tiny_world_phantom_evoid"])
def test_presets_are_valid(preset):
    validate_config(get_config(preset), num_processes=8 if preset in ("vace", "phantom") else 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sample.num_image_per_prompt", 3, "divisible by sample.num_image_per_prompt"),
        ("frames", 32, "frames \\(32\\) must be 4k \\+ 1, e.g. 33"),
        ("eval_height", 100, "divisible by 16"),
        ("train.timestep_fraction", 0.0, "timestep_fraction"),
        ("sample.noise_schedule", "ddim", "noise_schedule"),
        ("sample.noise_level", 0.0, "noise_level"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("model_type", "sora", "model_type"),
        ("sample.sde_window_size", 99, "sde_window_size"),
        ("sample.fast_branch", True, "fast_branch needs"),
        ("train.gradient_accumulation_steps", 3, "multiple of"),
        ("sample.untrained_steps", "euler", "untrained_steps"),
        ("train.filter_zero_advantage", "groups", "filter_zero_advantage"),
        ("train.ema_decay", 1.0, "ema_decay"),
        ("train.ema_update_interval", 0, "ema_update_interval"),
        ("reward_model.fps", 0.0, "reward_model.fps"),
        ("eval_videos", False, "eval_videos=False writes no evaluation videos, which report=True shows"),
    ],
)
def test_impossible_settings_name_the_field(field, value, message):
    config = get_config("tiny")
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_batch_layout_checked_against_process_count():
    config = get_config("vace")  # 4 per rank, K = 8
    validate_config(config, num_processes=2)
    with pytest.raises(ValueError, match="processes \\(1\\)"):
        validate_config(config, num_processes=1)


def test_default_trains_first_fraction_of_steps():
    config = get_config("vace")  # 25 steps, fraction 0.99 -> 24, as upstream
    assert num_train_steps(config) == 24
    assert trained_step_indices(config, 5) == list(range(24))
    # Upstream samples every step with the SDE, the untrained last one included.
    assert sde_step_indices(config, 5) == list(range(25))
    config.sample.untrained_steps = "ode"
    assert sde_step_indices(config, 5) == list(range(24))


def test_window_mode_draws_contiguous_windows():
    config = get_config("vace")
    config.sample.sde_window_size = 4
    windows = [sde_step_indices(config, step) for step in range(50)]
    assert all(w == list(range(w[0], w[0] + 4)) and 0 <= w[0] <= 21 for w in windows)
    assert len({w[0] for w in windows}) > 5  # the window moves
    assert sde_step_indices(config, 7) == windows[7]  # a pure function of the step (resume)
    assert all(trained_step_indices(config, step) == windows[step] for step in range(50))  # ODE outside
    assert num_train_steps(config) == 4
    # CPS has no noise on the final step, so its windows end before it.
    config.sample.noise_schedule = "cps"
    assert max(trained_step_indices(config, step)[-1] for step in range(200)) == 23


def test_attention_backend_choice():
    from identity_grpo.models import attention_backend

    config = get_config("tiny")
    assert attention_backend(config) == "native"  # no CUDA here
    config.attention_backend = "_native_math"
    assert attention_backend(config) == "_native_math"


def test_phantom_guidance_switch():
    config = get_config("phantom_tiny")
    config.sample.guidance_scale = 1.0  # guidance off is allowed
    validate_config(config)
    config.sample.guidance_scale = 4.5
    with pytest.raises(ValueError, match="sample.text_guidance_scale"):
        validate_config(config)


@pytest.mark.parametrize("backend", ["flsh", "flash"])  # a typo; flash-attn is not installed here
def test_unusable_attention_backend_names_the_config_field(backend):
    from identity_grpo.models import set_attention_backend
    from identity_grpo.testing import build_vace_transformer

    with pytest.raises(ValueError, match=rf"config.attention_backend = '{backend}' cannot be used"):
        set_attention_backend(build_vace_transformer(), backend)


def test_cps_refuses_to_train_its_noiseless_final_step():
    config = get_config("tiny")  # 4 steps
    config.sample.noise_schedule = "cps"
    validate_config(config)  # floor(4 * 0.99) = 3 trained steps: the final one is not among them
    config.train.timestep_fraction = 1.0
    with pytest.raises(ValueError, match="no noise on the final step"):
        validate_config(config)
