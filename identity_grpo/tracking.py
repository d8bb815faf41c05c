"""Logging set-up and tracker helpers (accelerate trackers do the actual writing)."""

from __future__ import annotations

import logging

import diffusers
import transformers


def init_logging(accelerator) -> None:
    """INFO logs on the main process, warnings elsewhere; quiet library chatter."""
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
