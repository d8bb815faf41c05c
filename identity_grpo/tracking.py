"""Logging set-up and tracker helpers (accelerate trackers do the actual writing)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path


def init_logging(accelerator) -> None:
    """INFO logs on the main process, warnings elsewhere; quiet library chatter."""
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def flat_config(config, prefix: str = "") -> dict[str, int | float | str | bool]:
    """``a.b.c -> value`` with non-scalars as strings: what tensorboard's hparams accept."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def json_safe(value):
    """``value`` (nested dicts / lists) with every NaN or infinite float replaced by None: JSON has
    no NaN, and ``json.dumps`` would otherwise write a bare ``NaN`` that JSON readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line of valid JSON (non-finite numbers as null) to ``path``."""
    from identity_grpo.checkpoint import reporting_write_errors

    with reporting_write_errors(Path(path), "metrics"), open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` as indented, valid JSON (non-finite numbers as null)."""
    from identity_grpo.checkpoint import reporting_write_errors

    with reporting_write_errors(Path(path), "a summary"):
        Path(path).write_text(json.dumps(json_safe(record), indent=2, allow_nan=False))
