"""Loading the base video model and attaching LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Where ``pretrained.build_tiny`` may write random models: the tiny presets' folder
# (outputs/tiny_models/). Anywhere else a missing path is a mistake, never silently filled.
TINY_MODELS_FOLDER = "tiny_models"


def looks_local(value: str) -> bool:
    """Whether a model reference is meant as a local path rather than a hub id (``org/name``):
    absolute, ``./`` or ``~``, more than one ``/``, a backslash, or a first component that
    exists here (``outputs/x``). Such a value is never tried on the hub (retries take half a minute)."""
    value = str(value)
    parts = value.replace("\\", "/").split("/")
    return (value.startswith((".", "~", "/")) or "\\" in value or len(parts) > 2 or value.endswith("/")
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def may_build_tiny(config, path: str) -> bool:
    """Whether ``pretrained.build_tiny`` is set and ``path`` is a place it may write to."""
    return bool(config.pretrained.get("build_tiny", False)) and Path(path).parent.name == TINY_MODELS_FOLDER


def model_path_error(config, field: str, path: str, required: str) -> str | None:
    """Why ``config.<field> = path`` cannot be loaded (``required``: a file it must hold), or None.
    Hub ids are accepted unless the hub is switched off (``HF_HUB_OFFLINE``) and the id is not cached."""
    if not path:
        return f"config.{field} is empty; set it to a local folder or a hub id"
    if Path(path).is_dir():
        if not Path(path, required).is_file():
            return f"config.{field} = {path!r} has no {required}; point it at a complete diffusers folder"
        return None
    if may_build_tiny(config, path):
        return None
    if config.pretrained.get("build_tiny", False) and not Path(path).exists():
        return (f"config.{field} = {path!r} does not exist, and pretrained.build_tiny writes random models only "
                f"inside a '{TINY_MODELS_FOLDER}/' folder (the tiny presets' outputs/{TINY_MODELS_FOLDER}/), so a "
                "mistyped path is not silently filled with random weights; fix the path")
    if Path(path).exists():
        return f"config.{field} = {path!r} is a file; it must be a folder (or a hub id)"
    if looks_local(path):
        return (f"config.{field} = {path!r} does not exist (it looks like a local path, so it is not tried as a "
                "hub id); fix the path")
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot_download(path, local_files_only=True)
        return None  # in the hub cache
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not an id)
        pass
    if constants.HF_HUB_OFFLINE:
        return (f"config.{field} = {path!r} is not a local folder, and the hub is switched off "
                "(HF_HUB_OFFLINE) with no cached copy; download it or give a local folder")
    if not hub_reachable(constants.ENDPOINT):
        return (f"config.{field} = {path!r} is not a local folder nor in the hub cache, and the hub "
                f"({constants.ENDPOINT}) cannot be reached from this machine; download it where the hub is "
                "reachable and give the local folder")
    return None


def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (name lookup
    included): a quick probe, so an offline machine is told at once which field to fix instead
    of retrying downloads for half a minute once the models load."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False

    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    # getaddrinfo has no timeout of its own; a thread bounds a slow name lookup.
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        return executor.submit(connect).result(timeout=timeout + 1)
    except FutureTimeout:
        return False
    finally:
        executor.shutdown(wait=False)


def resolve_model_path(config) -> str:
    """The base model folder; writes the tiny offline models first if the config asks for them
    (only inside a ``tiny_models/`` folder, see :func:`may_build_tiny`)."""
    path = config.pretrained.model
    if may_build_tiny(config, path) and not Path(path, "model_index.json").is_file():
        from identity_grpo.testing import write_tiny_vace

        logger.info("writing tiny random VACE models to %s", path)
        write_tiny_vace(path)
    if not Path(path).is_dir() and looks_local(path):
        raise ValueError(model_path_error(config, "pretrained.model", path, "model_index.json"))
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
    pipeline.teacher = load_teacher(config, pipeline, device, dtype)
    backend = attention_backend(config)
    set_attention_backend(pipeline.transformer, backend)
    if pipeline.teacher is not None:
        set_attention_backend(pipeline.teacher, backend)
    logger.info("attention backend: %s", backend)
    pipeline.sigma_table = config.sample.sigma_table
    pipeline.ode_solver = config.sample.eval_solver
    # Upstream's scoring path, exactly: its uint8 conversion truncates before the mp4 is written.
    pipeline.truncate_frames = bool(config.reward_model.mp4_roundtrip)
    return pipeline


# What a text-to-video teacher must share with the trained transformer to read its latents and
# prompt embeddings.
TEACHER_FIELDS = ("in_channels", "out_channels", "patch_size", "text_dim")


def load_teacher(config, pipeline, device: torch.device, dtype: torch.dtype):
    """EvoID's frozen text-to-video teacher, a ``WanTransformer3DModel`` in ``dtype``, or None when
    none is loaded: the algorithm is not "evoid", or the model is VACE and ``pretrained.teacher``
    is empty (VACE's own base with its context off is then the teacher, see
    :meth:`~identity_grpo.pipelines.base.RolloutPipeline.text_to_video_velocity`).

    Reads ``pretrained.teacher`` (a diffusers folder with a ``transformer`` subfolder, a transformer
    folder, or a hub id), for Phantom by default ``pretrained.model``: the Wan2.1-T2V folder whose
    transformer Phantom was fine-tuned from. Refuses a teacher whose input, output, patch or text
    sizes differ from ``pipeline``'s transformer, naming the field.
    """
    if config.algorithm != "evoid":
        return None
    path = config.pretrained.get("teacher", "") or (config.pretrained.model if config.model_type == "phantom" else "")
    if not path:
        return None
    from diffusers import WanTransformer3DModel

    local = Path(path).is_dir()
    subfolder = "transformer" if not local or Path(path, "transformer", "config.json").is_file() else None
    teacher = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype,
                                                    local_files_only=local)
    trained = pipeline.transformer_config
    mismatched = [f"{field} {teacher.config[field]} (the trained transformer's: {trained[field]})"
                  for field in TEACHER_FIELDS if _as_list(teacher.config[field]) != _as_list(trained[field])]
    if mismatched:
        raise ValueError(f"config.pretrained.teacher = {path!r} cannot teach this model: {', '.join(mismatched)}; "
                         "give the text-to-video transformer of the same family (Wan2.1-T2V-1.3B for the 1.3B models)")
    teacher.requires_grad_(False)
    teacher.eval()
    logger.info("EvoID text-to-video teacher: %s%s", path, f" ({subfolder})" if subfolder else "")
    return teacher.to(device)


def _as_list(value):
    """``patch_size`` is a list in JSON and a tuple in code; compare either as a list."""
    return list(value) if isinstance(value, (list, tuple)) else value


def attention_backend_error(backend: str) -> str | None:
    """Why diffusers cannot use attention backend ``backend`` (unknown name, missing package),
    known without building a model; None when it can, or when it is empty (automatic)."""
    if not backend:
        return None
    from diffusers.models import attention_dispatch

    try:
        name = attention_dispatch.AttentionBackendName(backend)
    except ValueError:
        names = sorted(item.value for item in attention_dispatch.AttentionBackendName)
        return f"config.attention_backend = {backend!r} is not a diffusers attention backend; choose one of {names}"
    try:  # a private helper of diffusers: if it moves, set_attention_backend still reports at load time
        check = attention_dispatch._check_attention_backend_requirements
    except AttributeError:
        return None
    try:
        check(name)
    except (RuntimeError, ImportError) as error:
        return (f"config.attention_backend = {backend!r} cannot be used here: {error} Leave it empty for the "
                "automatic choice (flash when flash-attn is installed on CUDA, native otherwise).")
    return None


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


# Wan's repeated blocks (VACE adds its own): the units FSDP2 shards and all-gathers one at a time.
WAN_BLOCK_CLASSES = ("WanTransformerBlock", "WanVACETransformerBlock")


def fsdp2_plugin(accelerator):
    """The FSDP2 settings of this launch (``accelerate launch --config_file
    scripts/accelerate_configs/fsdp2.yaml``), or None when the transformer is replicated (DDP).

    On GPUs accelerate holds them (``distributed_type: FSDP``). accelerate runs CPU ranks as
    MULTI_CPU and ignores FSDP there, so on CPU they are read from the environment the launcher
    set; both go through :func:`shard_transformer`, so CPU tests run the GPU wrapping."""
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.num_processes > 1:
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError(f"the accelerate config sets fsdp_version: {plugin.fsdp_version}; the LoRA training needs "
                         "FSDP2 (fsdp_version: 2, see scripts/accelerate_configs/fsdp2.yaml)")
    if plugin.activation_checkpointing:
        raise ValueError("the accelerate config sets fsdp_activation_checkpointing: true; set it to false, the "
                         "transformer's own checkpointing is config.train.gradient_checkpointing")
    return plugin


def fsdp2_mesh(accelerator):
    """The device mesh FSDP2 shards over: accelerate's (its ``dp_replicate`` x ``dp_shard`` dims:
    hybrid sharding across nodes, scripts/accelerate_configs/fsdp2_hybrid_multi_node.yaml) when it
    built one, else all ranks in one dimension."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))


def shard_transformer(peft_model, plugin, mesh, compute_dtype: torch.dtype) -> None:
    """Shard ``peft_model`` in place with FSDP2's ``fully_shard``: each Wan block (the classes in
    the config's ``fsdp_transformer_layer_cls_to_wrap``) is one unit, the rest (patch and
    condition embeddings, output head) the root's. Frozen base weights and LoRA adapters (the
    trained one and, for the forward-process objectives, the old one) are sharded alike; every
    parameter becomes a DTensor (:func:`identity_grpo.checkpoint.full_tensor` gathers one).

    Mixed precision: weights are all-gathered in ``compute_dtype``; gradients (the LoRA's, fp32)
    are reduced in fp32, as DDP reduces them. Every rank must then make the same transformer calls
    (each call all-gathers): rollouts, re-scoring and evaluation are padded to equal counts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = list(plugin.transformer_cls_names_to_wrap or [])
    blocks = [module for module in peft_model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap = {names} names no module of "
                         f"{type(peft_model.get_base_model()).__name__}; set fsdp_auto_wrap_policy: "
                         f"TRANSFORMER_BASED_WRAP and fsdp_transformer_layer_cls_to_wrap: {','.join(WAN_BLOCK_CLASSES)} "
                         "in the accelerate config")
    # Each rank drew its own random LoRA initialisation (seeds are per rank) and fully_shard keeps
    # each rank's slice of its own copy: start every rank from rank 0's, as DDP does.
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:
            torch.distributed.broadcast(parameter.data, src=0)
    mp_policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                     reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    for block in blocks:
        fully_shard(block, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    fully_shard(peft_model, **kwargs)  # the root keeps its own weights gathered between forward and backward
    logger.info("FSDP2: %d blocks sharded over %s", len(blocks), mesh)
