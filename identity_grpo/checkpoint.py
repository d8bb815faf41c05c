"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<run_dir>/checkpoints/checkpoint-<epoch>`` holding everything needed to
continue the run bit for bit: the LoRA (peft format, ``lora/``, plus the diffusers format that
``WanVACEPipeline.load_lora_weights`` accepts, ``lora_diffusers/``), the optimizer state, the EMA
weights and ``state.json`` (next epoch, optimizer step, run name). Rollouts, the prompt sampler and
the shuffles are seeded by ``(seed, epoch, ...)``, so they need no saved RNG state.

The folder is written under a temporary name and renamed when complete, so a crash never leaves
a half checkpoint that looks finished. Before anything on disk is moved or any weight loaded,
:func:`verify_checkpoint` reads every file (``state.json`` parsed, ``optimizer.pt`` / ``ema.pt``
unpickled, the safetensors read); resuming from a run folder falls back past a broken newest
checkpoint to the latest complete one and logs which and why. A failed write (full disk) names
the path and removes only its own temporary folder.
Written by hand because ``accelerator.save_state`` would store the frozen 1.3B base weights too.

Under FSDP2 every parameter, optimizer state and EMA weight is a DTensor holding this rank's
shard. Saving gathers the LoRA-sized tensors whole (a collective: every rank calls the save
functions, the main process writes), so a checkpoint has the same files whether it was written
under DDP or FSDP2, and either can resume it; loading cuts each tensor back into the rank's shard.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REQUIRED_FILES = (
    "lora/adapter_config.json",
    "lora/adapter_model.safetensors",
    "lora_diffusers/pytorch_lora_weights.safetensors",
    "optimizer.pt",
    "state.json",
)
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (an FSDP2 shard) is all-gathered, a collective that every rank
    must call in the same order; any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole ``tensor`` cut as ``like`` is: this rank's shard when ``like`` is a DTensor (no
    communication: every rank holds the whole tensor), else ``tensor`` on ``like``'s device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor.to(like.device)
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def adapter_state_dict(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``adapter``'s LoRA tensors whole, on the CPU, keyed as in ``peft_model.state_dict()``
    (collective under FSDP2: call it on every rank)."""
    marker = f".{adapter}."
    return {name: full_tensor(p.detach()).cpu() for name, p in peft_model.named_parameters()
            if marker in f"{name}." and "lora_" in name}


def diffusers_lora_state_dict(peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights keyed as the diffusers LoRA loaders expect (no peft wrapper prefix);
    from ``state_dict`` (:func:`adapter_state_dict`) when given."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    prefix = "base_model.model."
    return {k.removeprefix(prefix): v.detach().cpu() for k, v in state.items()}


def save_lora(peft_model, folder: Path, pipeline_class=None, *, is_main_process: bool = True) -> None:
    """``folder/lora`` (peft) and ``folder/lora_diffusers`` (``pipe.load_lora_weights`` format,
    with the adapter config as metadata so alpha survives). Call it on every rank (under FSDP2 the
    weights are gathered first); only ``is_main_process`` writes."""
    # Only the trained adapter: the forward-process objectives' "old" adapter is checkpoint state
    # (old_policy.pt), not part of the result.
    state_dict = adapter_state_dict(peft_model)
    if is_main_process:
        _write_lora(peft_model, folder, state_dict, pipeline_class)


def _write_lora(peft_model, folder: Path, state_dict: dict[str, torch.Tensor], pipeline_class=None) -> None:
    """The two LoRA formats of :func:`save_lora`, from the gathered ``state_dict``."""
    if pipeline_class is None:
        from diffusers import WanVACEPipeline as pipeline_class
    peft_model.save_pretrained(folder / "lora", selected_adapters=["default"], state_dict=state_dict)
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    pipeline_class.save_lora_weights(
        folder / "lora_diffusers", transformer_lora_layers=diffusers_lora_state_dict(peft_model, state_dict),
        transformer_lora_adapter_metadata=config,
    )


@contextmanager
def reporting_write_errors(path: Path, what: str) -> Iterator[None]:
    """Re-raise a failed write under ``path`` as an ``OSError`` naming the path and, when the disk
    is full, saying so: torch reports a full disk as a C++ enforce message ("file write failed")
    and safetensors as a Rust one, neither naming the file."""
    try:
        yield
    except Exception as error:
        is_safetensors = type(error).__name__ == "SafetensorError"
        if not isinstance(error, (OSError, RuntimeError)) and not is_safetensors:
            raise
        message = str(error)
        if (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in message or "StorageFull" in message
                or _free_bytes(path) == 0):
            raise OSError(errno.ENOSPC, f"the disk is full: writing {what} to {path} failed ({message}); free space "
                                        "there, or point logdir at another disk, and rerun") from error
        if isinstance(error, OSError) or is_safetensors or "write" in message:
            raise OSError(getattr(error, "errno", None) or errno.EIO,
                          f"writing {what} to {path} failed: {message}") from error
        raise


def _free_bytes(path: Path) -> int | None:
    """Free space on the disk holding ``path`` (its nearest existing ancestor), or None."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every state tensor whole and on the CPU (collective under FSDP2)."""
    state = optimizer.state_dict()
    return {**state, "state": {index: {key: full_tensor(value).cpu() if torch.is_tensor(value) else value
                                       for key, value in per_parameter.items()}
                               for index, per_parameter in state["state"].items()}}


def full_ema_state(ema) -> dict:
    """``ema.state_dict()`` (a diffusers ``EMAModel``) with whole shadow weights on the CPU (collective under FSDP2)."""
    state = ema.state_dict()
    return {**state, "shadow_params": [full_tensor(p).cpu() for p in state["shadow_params"]]}


def save_checkpoint(run_dir: Path, *, epoch: int, global_step: int, peft_model, optimizer, ema=None,
                    limit: int = 0, extra_state: dict | None = None,
                    old_policy: dict[str, torch.Tensor] | None = None, is_main_process: bool = True) -> Path | None:
    """Write ``checkpoint-<epoch>`` atomically; keep the newest ``limit``. Call it on every rank
    (under FSDP2 the LoRA, optimizer and EMA tensors are gathered first); only ``is_main_process``
    writes, and gets the folder (the others None).

    A failed write (e.g. a full disk) removes the temporary folder and raises ``OSError`` naming
    it; the earlier checkpoints are untouched."""
    lora_state = adapter_state_dict(peft_model)
    optimizer_state = full_optimizer_state(optimizer)
    ema_state = full_ema_state(ema) if ema is not None else None
    if not is_main_process:
        return None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{epoch:06d}"
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with reporting_write_errors(staging, "a checkpoint"):
            staging.mkdir()
            _write_lora(peft_model, staging, lora_state)
            torch.save(optimizer_state, staging / "optimizer.pt")
            if ema_state is not None:
                torch.save(ema_state, staging / "ema.pt")
            if old_policy is not None:
                torch.save(old_policy, staging / "old_policy.pt")
            state = {"epoch": epoch, "global_step": global_step, "run_name": Path(run_dir).name, **(extra_state or {})}
            (staging / "state.json").write_text(json.dumps(state, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a partial folder would only take more space
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    if limit > 0:
        for old in complete_checkpoints(root)[:-limit]:
            shutil.rmtree(old)
    logger.info("saved %s", final)
    return final


def set_aside_later_checkpoints(checkpoint: Path) -> list[Path]:
    """Move the checkpoints newer than ``checkpoint`` (a run resumed from an earlier one) into
    ``checkpoints/superseded-<name>/``: kept on disk, but no longer the run folder's latest nor
    counted by ``num_checkpoint_limit``. Returns their new paths (main process only)."""
    root = checkpoint.parent
    later = [p for p in complete_checkpoints(root) if p.name > checkpoint.name]
    if not later:
        return []
    aside = root / f"superseded-{checkpoint.name}"
    aside.mkdir(exist_ok=True)
    moved = []
    for path in later:
        target = aside / path.name
        if target.exists():  # set aside by an earlier resume from the same checkpoint
            target = aside / f"{path.name}~{len(list(aside.iterdir()))}"
        os.rename(path, target)
        moved.append(target)
    logger.warning("resuming from %s: moved the %d later checkpoint(s) of the abandoned continuation to %s",
                   checkpoint.name, len(moved), aside)
    return moved


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders under ``root``, oldest first (temporary folders excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> dict:
    """Read every file of checkpoint ``path`` once and check that they agree; returns its state.

    Raises :class:`CheckpointError` naming the first missing, unreadable or inconsistent file.
    Reads the files in full (a LoRA checkpoint is small), so a truncated file is caught here,
    before anything on disk is moved or any model weight is touched."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing})")

    def unreadable(name: str, error: Exception) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {name} cannot be read ({type(error).__name__}: {error})")

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise unreadable("state.json", error) from error
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("epoch", "global_step")):
        raise CheckpointError(f"checkpoint {path}: state.json must hold integer 'epoch' and 'global_step', got {state!r}")
    if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit() and int(path.name[len(PREFIX):]) != state["epoch"]:
        raise CheckpointError(f"checkpoint {path}: state.json says epoch {state['epoch']} but the folder is "
                              f"{path.name}; the files do not belong together")
    try:
        json.loads((path / "lora" / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise unreadable("lora/adapter_config.json", error) from error
    for name in ("lora/adapter_model.safetensors", "lora_diffusers/pytorch_lora_weights.safetensors"):
        try:
            if not load_file(path / name):
                raise ValueError("no tensors")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise unreadable(name, error) from error
    for name, weights_only in (("optimizer.pt", True), ("ema.pt", False), ("old_policy.pt", True)):
        if (path / name).is_file():
            try:
                torch.load(path / name, map_location="cpu", weights_only=weights_only)
            except Exception as error:  # unpickling raises many types (EOFError, RuntimeError, ...)
                raise unreadable(name, error) from error
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint folder from ``config.resume_from``: a checkpoint itself (refused if
    any file is broken), or a run folder: its latest checkpoint that verifies, newer broken ones
    skipped with a warning that says which and why. Nothing on disk is changed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"resume_from={str(path)!r} does not exist")
    if (path / "state.json").exists() or path.name.startswith(PREFIX):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            raise CheckpointError(f"{error}; resume from an earlier checkpoint or the run folder instead") from error
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"resume_from={str(path)!r}: no checkpoints/{PREFIX}* folder in this run")
    problems = []
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resume_from=%s: the newest checkpoint(s) cannot be used, resuming from %s, the latest "
                           "complete one:\n  %s", path, candidate.name, "\n  ".join(problems))
        return candidate
    raise CheckpointError(f"resume_from={str(path)!r}: no usable checkpoint:\n  " + "\n  ".join(problems))


def load_checkpoint(path: Path, *, peft_model, optimizer, ema=None, old_policy: bool = False) -> dict:
    """Restore LoRA, optimizer, EMA and (``old_policy``) the forward-process objectives' old
    adapter from a checked checkpoint; returns its ``state.json``. Under FSDP2 each rank keeps its
    shard of every tensor."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from identity_grpo.old_policy import TRAINED, named_adapter_parameters

    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "lora" / "adapter_model.safetensors")
    parameters = named_adapter_parameters(peft_model, TRAINED)
    for key, value in weights.items():
        if key in parameters and value.shape != parameters[key].shape:
            raise CheckpointError(f"{path}/lora/adapter_model.safetensors does not fit this model's LoRA ({key}: "
                                  f"{tuple(value.shape)} in the file, {tuple(parameters[key].shape)} in the model); "
                                  "resume with the config the run was started with (train.lora_rank, pretrained.model)")
        if key in parameters:
            weights[key] = shard_like(value, parameters[key])
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as error:  # shape mismatch: another lora_rank or base model
        raise CheckpointError(f"{path}/lora/adapter_model.safetensors does not fit this model's LoRA ({error}); "
                              "resume with the config the run was started with (train.lora_rank, pretrained.model)") from error
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"{path}/lora does not match this model's LoRA (unexpected keys {unexpected[:5]})")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_parameter in optimizer_state["state"].items():
        if index < len(optimized):  # else load_state_dict below reports the mismatch
            like = optimized[index]
            per_parameter.update({key: shard_like(value, like) for key, value in per_parameter.items()
                                  if torch.is_tensor(value) and value.shape == like.shape})
    try:
        optimizer.load_state_dict(optimizer_state)
    except ValueError as error:  # parameter groups of another size: another LoRA layout
        raise CheckpointError(f"{path}/optimizer.pt does not fit this run's optimizer ({error}); resume with the "
                              "config the run was started with") from error
    if ema is not None:
        if not (path / "ema.pt").is_file():
            raise CheckpointError(f"{path} has no ema.pt but train.ema is on; set --config.train.ema=False")
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
        # EMAModel.load_state_dict keeps the loaded (CPU) tensors; its next step mixes them with
        # the model's parameters, so they go where (and as) those live.
        trained = list(parameters.values())
        if len(ema.shadow_params) != len(trained):
            raise CheckpointError(f"{path}/ema.pt holds {len(ema.shadow_params)} tensors, this model's LoRA "
                                  f"{len(trained)}; resume with the config the run was started with")
        ema.shadow_params = [shard_like(shadow, like) for shadow, like in zip(ema.shadow_params, trained)]
    if old_policy:
        from identity_grpo.old_policy import load_old_policy_state

        if not (path / "old_policy.pt").is_file():
            raise CheckpointError(f"{path} has no old_policy.pt: it was written by a GRPO run; resume it with "
                                  "config.algorithm = 'grpo'")
        load_old_policy_state(peft_model, torch.load(path / "old_policy.pt", map_location="cpu", weights_only=True))
    logger.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
    return state
