"""Start-up checks of a resolved config: every impossible setting fails before any model loads."""

from __future__ import annotations

import math
import os
from pathlib import Path

from identity_grpo.nft import OLD_POLICY_DECAY_TYPES
from identity_grpo.rewards import reward_model_folders
from identity_grpo.schedules import SIGMA_TABLES

ALGORITHMS = ("grpo", "nft", "evoid")
from identity_grpo.sde import NOISE_SCHEDULES, NOISELESS_FINAL_STEP


def num_train_steps(config) -> int:
    """How many of a rollout's denoising steps are recorded and trained (GRPO), or how many
    timesteps each clean sample is trained at (forward-process objectives)."""
    if config.algorithm != "grpo" and config.nft.num_timesteps > 0:
        return config.nft.num_timesteps
    if config.algorithm == "grpo" and config.sample.sde_window_size > 0:
        return config.sample.sde_window_size
    return max(1, math.floor(config.sample.num_steps * config.train.timestep_fraction))


def trained_step_indices(config, step: int) -> list[int]:
    """The recorded (= trained) steps of the rollouts of global sampling step ``step``.

    Default: the first ``num_train_steps`` steps. Window mode (``sample.sde_window_size > 0``,
    MixGRPO-style): a contiguous window whose start is drawn per sampling step, the same on all
    ranks (so batches stack and collectives match). Schedules whose final step has no noise
    (CPS) draw windows that end before it.
    """
    if config.algorithm != "grpo":
        return []  # forward-process objectives record no transitions
    size = config.sample.sde_window_size
    if size <= 0:
        return list(range(num_train_steps(config)))
    import torch

    last_start = config.sample.num_steps - size - (config.sample.noise_schedule in NOISELESS_FINAL_STEP)
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
    return list(range(start, start + size))


def sde_step_indices(config, step: int) -> list[int]:
    """The stochastic steps of the rollouts of global sampling step ``step``: the trained ones and,
    in the default mode with ``sample.untrained_steps == "sde"`` (upstream), every later step too.
    Window mode takes ODE steps outside its window. The forward-process objectives sample
    deterministically (no step is stochastic)."""
    if config.algorithm != "grpo":
        return []
    if config.sample.sde_window_size <= 0 and config.sample.untrained_steps == "sde":
        return list(range(config.sample.num_steps))
    return trained_step_indices(config, step)


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


def validate_config(config, num_processes: int = 1, *, training: bool = True, check_files: bool = False) -> None:
    """Raise ``ValueError`` listing every impossible setting with its field and the fix.

    ``training=False`` (batch inference) skips the checks that only concern the GRPO batch layout.
    ``check_files=True`` (the entry points) also checks the model folders and files the config
    names and the attention backend, from the file system alone, before any model loads.
    """
    errors = []
    sample, train = config.sample, config.train
    degree = config.get("context_parallel_degree", 1)
    if degree != 1:
        if not (isinstance(degree, int) and degree >= 2):
            errors.append(f"context_parallel_degree ({degree!r}) must be 1 (off) or an integer >= 2")
        elif degree != num_processes:
            errors.append(f"context_parallel_degree ({degree}) must equal the number of processes ({num_processes}): "
                          "data x context parallelism (a 2-D mesh) is not built yet; launch that many processes "
                          "or set it to 1")
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            errors.append("context_parallel_degree > 1 is not supported with FSDP2 yet; use the DDP "
                          "configuration (scripts/accelerate_configs/multi_gpu.yaml) or set it to 1")
    # Data replicas: a context-parallel group runs one batch (any other degree is an error above).
    replicas = num_processes // degree if degree in (1, num_processes) else num_processes
    if training and (sample.train_batch_size * replicas) % sample.num_image_per_prompt:
        errors.append(
            f"sample.train_batch_size ({sample.train_batch_size}) x data replicas ({replicas}: processes "
            f"({num_processes}) / context_parallel_degree ({degree})) must be divisible "
            f"by sample.num_image_per_prompt ({sample.num_image_per_prompt})"
        )
    if sample.num_image_per_prompt < 2:
        errors.append("sample.num_image_per_prompt must be >= 2: advantages compare the members of a group")
    if training and config.report and not config.eval_videos:
        errors.append("eval_videos=False writes no evaluation videos, which report=True shows; set report=False "
                      "too, or keep eval_videos=True")
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
    elif config.algorithm == "grpo" and sample.noise_schedule in NOISELESS_FINAL_STEP and sample.num_steps >= 1 and (
            num_train_steps(config) >= sample.num_steps):
        errors.append(
            f"sample.noise_schedule {sample.noise_schedule!r} has no noise on the final step (sigma_next = 0), so it "
            f"cannot be trained, but all {sample.num_steps} steps would be: lower train.timestep_fraction "
            f"({train.timestep_fraction}) or sample.sde_window_size ({sample.sde_window_size}) below sample.num_steps"
        )
    if sample.sigma_table not in SIGMA_TABLES:
        errors.append(f"sample.sigma_table ({sample.sigma_table!r}) must be one of {SIGMA_TABLES}")
    if config.algorithm not in ALGORITHMS:
        errors.append(f"algorithm ({config.algorithm!r}) must be one of {ALGORITHMS}")
    elif config.algorithm != "grpo":
        nft = config.nft
        if not nft.beta > 0:
            errors.append(f"nft.beta ({nft.beta}) must be > 0")
        if nft.timestep_sampling not in ("sampler", "uniform", "logit_normal"):
            errors.append(f"nft.timestep_sampling ({nft.timestep_sampling!r}) must be 'sampler', 'uniform' or "
                          "'logit_normal'")
        elif nft.timestep_sampling == "sampler" and num_train_steps(config) > sample.num_steps:
            errors.append(f"nft.num_timesteps ({nft.num_timesteps}) must be <= sample.num_steps ({sample.num_steps}) "
                          "with nft.timestep_sampling = 'sampler' (it draws the sampler's timesteps without repeats)")
        if nft.num_timesteps < 0:
            errors.append(f"nft.num_timesteps ({nft.num_timesteps}) must be >= 0 (0: from train.timestep_fraction)")
        if nft.old_policy_decay_type not in OLD_POLICY_DECAY_TYPES:
            errors.append(f"nft.old_policy_decay_type ({nft.old_policy_decay_type}) must be one of "
                          f"{OLD_POLICY_DECAY_TYPES}")
        if config.algorithm == "evoid":
            if not (config.evoid.lambda_t2v >= 0 and config.evoid.lambda_self >= 0):
                errors.append(f"evoid.lambda_t2v ({config.evoid.lambda_t2v}) and evoid.lambda_self "
                              f"({config.evoid.lambda_self}) must be >= 0")
        if sample.sde_window_size or sample.fast_branch or sample.eval_sde:
            errors.append(f"algorithm {config.algorithm!r} samples deterministically: sample.sde_window_size, "
                          "sample.fast_branch and sample.eval_sde are GRPO settings; unset them")
    if sample.eval_solver not in ("scheduler", "euler"):
        errors.append(f"sample.eval_solver ({sample.eval_solver!r}) must be 'scheduler' (the model's own) or 'euler'")
    if sample.store_dtype not in ("fp32", "bf16", "fp16"):
        errors.append(f"sample.store_dtype ({sample.store_dtype!r}) must be 'fp32', 'bf16' or 'fp16'")
    if sample.untrained_steps not in ("sde", "ode"):
        errors.append(f"sample.untrained_steps ({sample.untrained_steps!r}) must be 'sde' (upstream) or 'ode'")
    if sample.noise_level <= 0:
        errors.append("sample.noise_level must be > 0: the SDE needs noise to explore")
    if train.clip_range <= 0:
        errors.append("train.clip_range must be > 0")
    if train.beta < 0:
        errors.append("train.beta must be >= 0")
    if train.filter_zero_advantage not in ("sample", "group", "none"):
        errors.append(
            f"train.filter_zero_advantage ({train.filter_zero_advantage!r}) must be 'sample' (upstream), 'group' or 'none'")
    if not 0 <= train.ema_decay < 1:
        errors.append(f"train.ema_decay ({train.ema_decay}) must be in [0, 1)")
    if train.ema_update_interval < 1:
        errors.append(f"train.ema_update_interval ({train.ema_update_interval}) must be >= 1 (optimizer steps)")
    reward_model = config.reward_model
    if not reward_model.fps > 0:
        errors.append(f"reward_model.fps ({reward_model.fps}) must be > 0 (upstream's rollouts are 10 fps)")
    if reward_model.batch_size < 1 or reward_model.num_frames < 0 or reward_model.max_frame_pixels < 0:
        errors.append("reward_model.batch_size must be >= 1, num_frames and max_frame_pixels >= 0 (0: the model's own)")
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
    errors += _field_range_errors(config, training)
    if check_files:
        errors += _path_errors(config, training)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nan_fields(section, prefix: str = "") -> list[str]:
    """Every float field holding NaN, dotted (a NaN compares false with every bound)."""
    found = []
    for key, value in section.items():
        if hasattr(value, "items"):
            found += _nan_fields(value, f"{prefix}{key}.")
        elif isinstance(value, float) and math.isnan(value):
            found.append(f"{prefix}{key}")
    return found


def _field_range_errors(config, training: bool) -> list[str]:
    """Each numeric field outside its range, with the range (bounds written out per field)."""
    sample, train = config.sample, config.train
    errors = [f"{name} is NaN; give a number" for name in _nan_fields(config)]
    # (field, value, predicate, the range in words)
    checks = [
        ("save_freq", config.save_freq, lambda v: v >= 0, ">= 0 (0 disables saving)"),
        ("eval_freq", config.eval_freq, lambda v: v >= 0, ">= 0 (0 disables evaluation)"),
        ("num_checkpoint_limit", config.num_checkpoint_limit, lambda v: v >= 0, ">= 0 (0 keeps all)"),
        ("log_videos_freq", config.log_videos_freq, lambda v: v >= 0, ">= 0 (0 disables)"),
        ("log_videos_count", config.log_videos_count, lambda v: v >= 0, ">= 0"),
        ("video_fps", config.video_fps, lambda v: v > 0, "> 0"),
        ("height", config.height, lambda v: v >= 16, ">= 16"),
        ("width", config.width, lambda v: v >= 16, ">= 16"),
        ("eval_height", config.eval_height, lambda v: v >= 16, ">= 16"),
        ("eval_width", config.eval_width, lambda v: v >= 16, ">= 16"),
        ("frames", config.frames, lambda v: v >= 1, ">= 1"),
        ("eval_frames", config.eval_frames, lambda v: v >= 1, ">= 1"),
        ("sample.test_batch_size", sample.test_batch_size, lambda v: v >= 1, ">= 1"),
        ("sample.max_sequence_length", sample.max_sequence_length, lambda v: v >= 1, ">= 1"),
        ("sample.guidance_scale", sample.guidance_scale, lambda v: 0 <= v < math.inf, ">= 0 and finite (1.0: no CFG)"),
        ("sample.image_guidance_scale", sample.image_guidance_scale, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("sample.text_guidance_scale", sample.text_guidance_scale, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("sample.flow_shift", sample.flow_shift, lambda v: 0 <= v < math.inf, ">= 0 and finite (0: the scheduler's)"),
        ("sample.conditioning_scale", sample.conditioning_scale, math.isfinite, "finite"),
        ("sample.noise_level", sample.noise_level, math.isfinite, "finite"),
        ("train.lora_rank", train.lora_rank, lambda v: v >= 1, ">= 1"),
        ("train.lora_alpha", train.lora_alpha, lambda v: 0 < v < math.inf, "> 0"),
    ]
    if training:
        checks += [
            ("num_epochs", config.num_epochs, lambda v: v >= 1, ">= 1"),
            ("sample.train_batch_size", sample.train_batch_size, lambda v: v >= 1, ">= 1"),
            ("sample.num_batches_per_epoch", sample.num_batches_per_epoch, lambda v: v >= 1, ">= 1"),
            ("train.learning_rate", train.learning_rate, lambda v: 0 < v < math.inf,
             "> 0 and finite (at 0 the run trains nothing)"),
            ("train.adam_beta1", train.adam_beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("train.adam_beta2", train.adam_beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("train.adam_weight_decay", train.adam_weight_decay, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
            ("train.adam_epsilon", train.adam_epsilon, lambda v: 0 < v < math.inf, "> 0 and finite"),
            ("train.max_grad_norm", train.max_grad_norm, lambda v: 0 < v < math.inf, "> 0 and finite"),
            ("train.num_inner_epochs", train.num_inner_epochs, lambda v: v >= 1, ">= 1"),
            ("train.adv_clip_max", train.adv_clip_max, lambda v: v > 0, "> 0"),
            ("train.advantage_sign", train.advantage_sign, lambda v: v != 0 and math.isfinite(v),
             "nonzero and finite (1: maximise the reward, -1: minimise it)"),
        ]
    if training and sample.noise_schedule == "identity_grpo" and sample.num_steps == 1:
        # Its noise bounds are sigmas[1] and sigmas[-1], both the final sigma 0 in a 1-step
        # schedule: the one step has no noise whatever sample.noise_level is.
        errors.append("sample.num_steps = 1 leaves the 'identity_grpo' noise schedule without noise (its bounds are "
                      "the schedule's second and last sigma, both 0), so the step cannot be trained, whatever "
                      "sample.noise_level is: use sample.num_steps >= 2")
    for name, value, valid, bound in checks:
        if not _is_number(value):
            errors.append(f"{name} must be a number {bound}, got {value!r}")
        elif not math.isnan(value) and not valid(value):
            errors.append(f"{name} ({value}) must be {bound}")
    return errors + _reward_weight_errors(config)


def _reward_weight_errors(config) -> list[str]:
    """Unknown or unavailable reward names (from the registry, nothing is built) and weights that
    leave nothing to learn."""
    from identity_grpo.rewards import import_reward_modules, unknown_reward_error

    weights = dict(config.reward_fn)
    errors = []
    try:
        import_reward_modules(getattr(config, "reward_modules", ""))
    except ValueError as error:
        errors.append(str(error))
    if weights and (error := unknown_reward_error(weights)):
        errors.append(error)
    numbers = [w for w in weights.values() if _is_number(w)]
    if any(not math.isfinite(w) for w in numbers):
        errors.append(f"reward_fn weights must be finite, got {weights}")
    elif numbers and len(numbers) == len(weights) and all(w == 0 for w in numbers):
        errors.append(f"every reward_fn weight is 0 ({weights}): the total reward is constant, so every advantage is "
                      "0 and nothing is learned; give at least one reward a nonzero weight")
    return errors


def _path_errors(config, training: bool) -> list[str]:
    """Model folders and files the config names that cannot be loaded, found from the file system
    alone (no model is built): missing local paths, folders without their config file, hub ids
    when the hub is switched off and nothing is cached."""
    from identity_grpo.models import attention_backend_error, may_build_tiny, model_path_error
    from identity_grpo.rewards import config_field

    pretrained = config.pretrained
    errors = [model_path_error(config, "pretrained.model", pretrained.model, "model_index.json")]
    dit = pretrained.get("phantom_dit", "")
    if config.model_type == "phantom" and dit and not Path(dit).exists() and not (
            may_build_tiny(config, pretrained.model) and not Path(pretrained.model).exists()):
        errors.append(f"config.pretrained.phantom_dit = {dit!r} does not exist; point it at Phantom-Wan-1.3B.pth or "
                      "a converted diffusers transformer folder")
    teacher = pretrained.get("teacher", "")
    if config.algorithm == "evoid" and teacher:
        if Path(teacher).is_dir() and not (Path(teacher, "config.json").is_file()
                                           or Path(teacher, "transformer", "config.json").is_file()):
            errors.append(f"config.pretrained.teacher = {teacher!r} holds neither config.json nor transformer/config.json; "
                          "point it at a Wan2.1-T2V diffusers folder or its transformer folder")
        elif not Path(teacher).is_dir():
            errors.append(model_path_error(config, "pretrained.teacher", teacher, "config.json"))
    weights = dict(config.reward_fn)
    if "identity" in weights:  # built and scored even at weight 0 (then logged, not optimised)
        folders = reward_model_folders(pretrained.get("reward_model", ""))
        for path in folders or [""]:
            if not (Path(path, "reward_config.json").is_file() or Path(path, "model_config.json").is_file()
                    or (may_build_tiny(config, path) and not Path(path).exists())):
                state = "does not exist" if not Path(path).exists() else (
                    "holds neither reward_config.json (standard layout) nor model_config.json (upstream layout)")
                errors.append(f"config.pretrained.reward_model: {path!r} {state}, and reward_fn lists 'identity'; point "
                              "it at the identity reward model folder, or several separated by commas "
                              "(docs/reward_model.md)")
    for reward, section, field in (("aesthetic", "aesthetic", "clip_path"), ("aesthetic", "aesthetic", "head_path"),
                                   ("naturalness", "naturalness", "model_path")):
        path = str(config_field(config_field(config, section, None), field, ""))
        if reward in weights and path and not Path(path).exists():
            errors.append(f"config.{section}.{field} = {path!r} does not exist, and reward_fn lists {reward!r}")
    errors.append(train_lora_error(config.train.lora_path))  # the warm start, or the LoRA a test run generates with
    errors.append(attention_backend_error(config.get("attention_backend", "")))
    return [error for error in errors if error]


def train_lora_error(path: str) -> str | None:
    """Why ``train.lora_path`` is not a peft LoRA folder, or None (also None when empty)."""
    if path and not Path(path, "adapter_config.json").is_file():
        return f"train.lora_path = {path!r} has no adapter_config.json; point it at a peft LoRA folder"
    return None
