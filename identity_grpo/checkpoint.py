"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<run_dir>/checkpoints/checkpoint-<epoch>`` holding everything needed to
continue the run bit for bit: the LoRA (peft format, ``lora/``, plus the diffusers format that
``WanVACEPipeline.load_lora_weights`` accepts, ``lora_diffusers/``), the optimizer state, the EMA
weights and ``state.json`` (next epoch, optimizer step, run name). Rollouts, the prompt sampler and
the shuffles are seeded by ``(seed, epoch, ...)``, so they need no saved RNG state.

The folder is written under a temporary name and renamed when complete, so a crash never leaves
a half checkpoint that looks finished; loading checks every file before touching the model.
Written by hand because ``accelerator.save_state`` would store the frozen 1.3B base weights too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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


def diffusers_lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The adapter weights keyed as the diffusers LoRA loaders expect (no peft wrapper prefix)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    prefix = "base_model.model."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.detach().cpu() for k, v in state.items()}


def save_lora(peft_model, folder: Path, pipeline_class=None) -> None:
    """``folder/lora`` (peft) and ``folder/lora_diffusers`` (``pipe.load_lora_weights`` format,
    with the adapter config as metadata so alpha survives)."""
    if pipeline_class is None:
        from diffusers import WanVACEPipeline as pipeline_class
    peft_model.save_pretrained(folder / "lora")
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    pipeline_class.save_lora_weights(
        folder / "lora_diffusers", transformer_lora_layers=diffusers_lora_state_dict(peft_model),
        transformer_lora_adapter_metadata=config,
    )


def save_checkpoint(run_dir: Path, *, epoch: int, global_step: int, peft_model, optimizer, ema=None,
                    limit: int = 0, extra_state: dict | None = None) -> Path:
    """Write ``checkpoint-<epoch>`` atomically (main process only); keep the newest ``limit``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{epoch:06d}"
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_lora(peft_model, staging)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), staging / "ema.pt")
    state = {"epoch": epoch, "global_step": global_step, "run_name": Path(run_dir).name, **(extra_state or {})}
    (staging / "state.json").write_text(json.dumps(state, indent=2))
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from ``config.resume_from``: a checkpoint itself, or a run folder
    (its latest complete checkpoint). Every required file is checked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"resume_from={str(path)!r} does not exist")
    if not (path / "state.json").exists() and not path.name.startswith(PREFIX):
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"resume_from={str(path)!r}: no checkpoints/{PREFIX}* folder in this run")
        path = found[-1]
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete (missing {missing}); resume from an earlier checkpoint "
            f"or the run folder instead"
        )
    return path


def load_checkpoint(path: Path, *, peft_model, optimizer, ema=None) -> dict:
    """Restore LoRA, optimizer and EMA from a checked checkpoint; returns its ``state.json``."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "lora" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"{path}/lora does not match this model's LoRA (unexpected keys {unexpected[:5]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        if not (path / "ema.pt").is_file():
            raise CheckpointError(f"{path} has no ema.pt but train.ema is on; set --config.train.ema=False")
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
        # EMAModel.load_state_dict keeps the loaded (CPU) tensors; its next step mixes them with
        # the model's parameters, so they go where those live.
        ema.to(device=next(p.device for p in peft_model.parameters() if p.requires_grad))
    logger.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
    return state
