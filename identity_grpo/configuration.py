"""Start-up checks of a resolved config: every impossible setting fails before any model loads."""

from __future__ import annotations

import math

from identity_grpo.sde import NOISE_SCHEDULES


def num_train_steps(config) -> int:
    """How many of a rollout's denoising steps are SDE steps that get trained."""
    if config.sample.sde_window_size > 0:
        return config.sample.sde_window_size
    return max(1, math.floor(config.sample.num_steps * config.train.timestep_fraction))


def sde_step_indices(config, step: int) -> list[int]:
    """The SDE (= trained) steps of the rollouts of global sampling step ``step``.

    Default: the first ``num_train_steps`` steps. Window mode (``sample.sde_window_size > 0``,
    MixGRPO-style): a contiguous window whose start is drawn per sampling step, the same on all
    ranks (so batches stack and collectives match), ODE elsewhere.
    """
    size = config.sample.sde_window_size
    if size <= 0:
        return list(range(num_train_steps(config)))
    import torch

    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    start = int(torch.randint(0, config.sample.num_steps - size + 1, (1,), generator=generator))
    return list(range(start, start + size))


def phantom_guidance_error(sample) -> str | None:
    """Phantom's guidance is set by its image and text scales; ``guidance_scale`` only switches it
    on (equal to the text scale) or off (1.0). Anything else is an error message."""
    if sample.guidance_scale > 1.0 and sample.guidance_scale != sample.text_guidance_scale:
        return (
            f"for Phantom, sample.guidance_scale ({sample.guidance_scale}) only switches guidance on (> 1) or off "
            f"(1.0); the text scale is sample.text_guidance_scale ({sample.text_guidance_scale}). Set "
            "sample.guidance_scale to sample.text_guidance_scale, or to 1.0 for no guidance"
        )
    return None


def validate_config(config, num_processes: int = 1, *, training: bool = True) -> None:
    """Raise ``ValueError`` listing every impossible setting with its field and the fix.

    ``training=False`` (batch inference) skips the checks that only concern the GRPO batch layout.
    """
    errors = []
    sample, train = config.sample, config.train
    if training and (sample.train_batch_size * num_processes) % sample.num_image_per_prompt:
        errors.append(
            f"sample.train_batch_size ({sample.train_batch_size}) x processes ({num_processes}) must be divisible "
            f"by sample.num_image_per_prompt ({sample.num_image_per_prompt})"
        )
    if sample.num_image_per_prompt < 2:
        errors.append("sample.num_image_per_prompt must be >= 2: advantages compare the members of a group")
    for prefix in ("", "eval_"):
        height, width, frames = config[prefix + "height"], config[prefix + "width"], config[prefix + "frames"]
        if height % 16 or width % 16:
            errors.append(f"{prefix}height/{prefix}width ({height}x{width}) must be divisible by 16")
        if frames % 4 != 1:
            errors.append(f"{prefix}frames ({frames}) must be 4k + 1, e.g. {frames - frames % 4 + 1}")
    if not 0 <= sample.sde_window_size <= sample.num_steps:
        errors.append(f"sample.sde_window_size ({sample.sde_window_size}) must be in [0, sample.num_steps]")
    if sample.fast_branch and config.model_type != "vace":
        errors.append("sample.fast_branch is implemented for model_type 'vace' only")
    if sample.fast_branch and sample.sde_window_size <= 0:
        errors.append("sample.fast_branch needs sample.sde_window_size > 0 (the SDE window after the shared prefix)")
    if not 0 < train.timestep_fraction <= 1:
        errors.append(f"train.timestep_fraction ({train.timestep_fraction}) must be in (0, 1]")
    if sample.num_steps < 1 or sample.eval_num_steps < 1:
        errors.append("sample.num_steps and sample.eval_num_steps must be >= 1")
    if sample.eval_sde and sample.eval_num_steps != sample.num_steps:
        errors.append(
            f"sample.eval_sde needs sample.eval_num_steps ({sample.eval_num_steps}) == sample.num_steps "
            f"({sample.num_steps}): the evaluated SDE must be the trained one"
        )
    if sample.noise_schedule not in NOISE_SCHEDULES:
        errors.append(f"sample.noise_schedule ({sample.noise_schedule!r}) must be one of {NOISE_SCHEDULES}")
    if sample.noise_level <= 0:
        errors.append("sample.noise_level must be > 0: the SDE needs noise to explore")
    if train.clip_range <= 0:
        errors.append("train.clip_range must be > 0")
    if train.beta < 0:
        errors.append("train.beta must be >= 0")
    if training and (
        train.gradient_accumulation_steps < 1 or sample.num_batches_per_epoch % train.gradient_accumulation_steps
    ):
        errors.append(
            f"sample.num_batches_per_epoch ({sample.num_batches_per_epoch}) must be a multiple of "
            f"train.gradient_accumulation_steps ({train.gradient_accumulation_steps}) so no gradient is left over"
        )
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        errors.append(f"mixed_precision ({config.mixed_precision!r}) must be 'no', 'fp16' or 'bf16'")
    if config.model_type not in ("vace", "phantom"):
        errors.append(f"model_type ({config.model_type!r}) must be 'vace' or 'phantom'")
    elif config.model_type == "phantom" and (error := phantom_guidance_error(sample)):
        errors.append(error)
    weights = dict(config.reward_fn)
    if not weights:
        errors.append("reward_fn is empty: name at least one reward and its weight, e.g. {'identity': 1.0}")
    elif not all(isinstance(w, (int, float)) for w in weights.values()):
        errors.append(f"reward_fn weights must be numbers, got {weights}")
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
