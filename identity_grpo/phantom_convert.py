"""Load the Phantom-Wan DiT: an original-format Wan checkpoint as released (1.3B: one ``.pth``;
14B: sharded safetensors with an ``.index.json``) or a diffusers folder.

Phantom-Wan-1.3B has the Wan2.1-T2V-1.3B architecture, so the released checkpoint maps onto
diffusers' ``WanTransformer3DModel`` with diffusers' own single-file converter
(``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers``). The architecture
(dims, layers, heads) comes from the T2V base folder's ``transformer/config.json``; a checkpoint
whose converted keys or shapes do not match it is rejected with the offending names, never
loaded partially.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Containers some training frameworks wrap a state dict in, and prefixes they add to its keys.
_CONTAINER_KEYS = ("state_dict", "model", "module", "ema")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMED = 10


class CheckpointConversionError(ValueError):
    """The checkpoint does not convert onto the expected Wan transformer."""


def _names(keys, limit: int = _MAX_NAMED) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def read_sharded_safetensors(index: Path) -> dict[str, torch.Tensor]:
    """Tensors of a sharded safetensors checkpoint from its ``*.index.json`` (``weight_map``:
    tensor name -> shard file in the index's folder), as Phantom-Wan-14B is released
    (``Phantom_Wan_14B.safetensors.index.json``). Every shard must exist and hold the tensors the
    index assigns to it."""
    import json

    from safetensors import safe_open

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as error:
        raise CheckpointConversionError(f"{index} is not a safetensors index (no readable 'weight_map'): {error}")
    state = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index} lists the shard {shard!r}, which is not in {index.parent}; download "
                                    "every shard of the checkpoint next to its index")
        with safe_open(str(path), framework="pt") as handle:
            wanted = [name for name, file in weight_map.items() if file == shard]
            missing = set(wanted) - set(handle.keys())
            if missing:
                raise CheckpointConversionError(f"{path} lacks tensors its index assigns to it: {_names(missing)}")
            state.update({name: handle.get_tensor(name) for name in wanted})
    return state


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an original-format checkpoint (``.pth`` / ``.pt`` / ``.safetensors``, or a sharded
    safetensors ``*.index.json``) on the CPU, unwrapped from a ``{"state_dict": ...}``-style
    container and stripped of DDP / compile prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Phantom DiT checkpoint {str(path)!r} does not exist; set pretrained.phantom_dit")
    if path.name.endswith(".index.json"):
        state = read_sharded_safetensors(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only: a .pth from the internet must not run code; mmap: 1.3B params are not copied.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for container in _CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(container), dict) and len(state) <= 4:
            state = state[container]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointConversionError(f"{path} does not hold a flat dict of tensors (got {type(state).__name__})")
    cleaned = {}
    for key, value in state.items():
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def convert_original_wan(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Original Wan keys -> diffusers keys, checked against ``expected`` (a model's state dict).

    Raises :class:`CheckpointConversionError` naming the missing keys, unexpected keys and shape
    mismatches, so a wrong file (e.g. an I2V or VACE checkpoint, or a 14B one) fails at once.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(state_dict))  # it pops from its argument
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    mismatched = [
        f"{key} {tuple(converted[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(converted)) if converted[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_names(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches (checkpoint vs model): {_names(mismatched)}")
        raise CheckpointConversionError(
            f"{source} does not convert onto WanTransformer3DModel with the base model's transformer config "
            "(is it the Phantom-Wan-1.3B DiT, and is pretrained.model the matching Wan2.1-T2V-1.3B base?):\n  "
            + "\n  ".join(problems)
        )
    return converted


def load_phantom_transformer(dit: str | Path, base: str | Path, dtype: torch.dtype = torch.float32,
                             local_files_only: bool = True):
    """``WanTransformer3DModel`` in ``dtype`` with Phantom's weights, frozen-ready (eval mode).

    Args:
        dit: an original-format checkpoint file, or a diffusers transformer folder (one holding
            ``config.json``, or a pipeline folder with a ``transformer/`` subfolder).
        base: the Wan2.1-T2V diffusers folder (or hub id) whose ``transformer/config.json`` gives
            the architecture of an original-format checkpoint.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    dit = Path(dit)
    if dit.is_dir():
        subfolder = None if (dit / "config.json").is_file() else "transformer"
        if not (dit / (subfolder or "") / "config.json").is_file():
            raise FileNotFoundError(f"{dit} is a folder without config.json or transformer/config.json; point "
                                    "pretrained.phantom_dit at the .pth or at a converted diffusers transformer folder")
        model = WanTransformer3DModel.from_pretrained(dit, subfolder=subfolder, torch_dtype=dtype,
                                                      local_files_only=True)
        return model.eval()
    model_config = WanTransformer3DModel.load_config(base, subfolder="transformer", local_files_only=local_files_only)
    # No random init of 1.3B parameters that are overwritten at once; buffers (RoPE tables) stay real.
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(model_config)
    state = convert_original_wan(read_original_state_dict(dit), model.state_dict(), source=str(dit))
    # Cast as ``from_pretrained(torch_dtype=...)`` does: the modules diffusers keeps in fp32 for
    # stability (RoPE, time embedder, norms, modulation tables) stay fp32, the rest gets ``dtype``.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    state = {
        key: value.to(torch.float32 if keep & set(key.split(".")) else dtype)
        for key, value in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
