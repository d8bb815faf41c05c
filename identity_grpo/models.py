"""Loading the base video model and attaching LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_model_path(config) -> str:
    """The base model folder; writes the tiny offline models first if the config asks for them."""
    path = config.pretrained.model
    if config.pretrained.get("build_tiny", False) and not Path(path, "model_index.json").is_file():
        from identity_grpo.testing import write_tiny_vace

        logger.info("writing tiny random VACE models to %s", path)
        write_tiny_vace(path)
    return path


def load_vace_pipeline(config, device: torch.device, dtype: torch.dtype):
    """``WanVACEPipeline`` with the transformer and text encoder in ``dtype`` and the VAE in fp32
    (Wan's VAE is numerically fragile in half precision). All weights frozen."""
    from diffusers import AutoencoderKLWan, WanVACEPipeline

    path = resolve_model_path(config)
    local = Path(path).is_dir()
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=local)
    pipe = WanVACEPipeline.from_pretrained(path, vae=vae, torch_dtype=dtype, local_files_only=local)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
        module.to(device)
    return pipe


def attention_backend(config) -> str:
    """diffusers attention backend: ``config.attention_backend`` if set, else ``flash`` when
    flash-attn is importable on CUDA, else ``native`` (PyTorch SDPA)."""
    chosen = config.get("attention_backend", "")
    if chosen:
        return chosen
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash"
        except ImportError:
            pass
    return "native"


def load_rollout_pipeline(config, device: torch.device, dtype: torch.dtype):
    """The batched rollout pipeline of ``config.model_type`` ("vace" or "phantom"), weights frozen,
    with the attention backend of :func:`attention_backend`."""
    if config.model_type == "phantom":
        from identity_grpo.pipelines.phantom import load_phantom_pipeline

        pipeline = load_phantom_pipeline(config, device, dtype)
    else:
        from identity_grpo.pipelines.vace import VaceRolloutPipeline

        pipeline = VaceRolloutPipeline(load_vace_pipeline(config, device, dtype), dtype=dtype)
    backend = attention_backend(config)
    set_attention_backend(pipeline.transformer, backend)
    logger.info("attention backend: %s", backend)
    return pipeline


def set_attention_backend(transformer, backend: str) -> None:
    """diffusers' ``set_attention_backend``, its error naming the config field to change."""
    try:
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError) as error:  # unknown name / package missing / unsupported device
        raise ValueError(f"config.attention_backend = {backend!r} cannot be used here: {error} "
                         "Leave it empty for the automatic choice (flash when flash-attn is installed "
                         "on CUDA, native otherwise).") from error


def add_lora(transformer, config):
    """Wrap ``transformer`` in a peft LoRA model (trainable params in fp32).

    Starts from ``config.train.lora_path`` when set, else from a fresh adapter whose ``lora_B``
    is zero, so the adapted model equals the base until the first update.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    train = config.train
    if train.lora_path:
        if not Path(train.lora_path, "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"train.lora_path={train.lora_path!r} has no adapter_config.json; point it at a peft LoRA folder"
            )
        model = PeftModel.from_pretrained(transformer, train.lora_path, is_trainable=True)
    else:
        lora_config = LoraConfig(
            r=train.lora_rank, lora_alpha=train.lora_alpha, init_lora_weights="gaussian",
            target_modules=list(train.lora_target_modules),
        )
        model = get_peft_model(transformer, lora_config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model
