"""Reward registry: ``name -> factory(config, device) -> fn(RewardInputs) -> {key: (B,) tensor}``.

A reward function returns at least the key equal to its own name (the score that is weighted);
extra keys are logged as sub-scores (e.g. ``facesim/min``). :func:`build_reward_fn` combines the
configured rewards with their weights in one place, times each one and refuses NaN/inf.
Rewards of one's own, outside the package, join through ``config.reward_modules``
(:func:`import_reward_modules`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


@dataclass
class RewardInputs:
    """What every reward sees for a batch of B generated videos.

    Attributes:
        frames: ``(B, F, H, W, 3)`` uint8 decoded frames, in memory.
        reference_images: per sample, its 1-4 reference images (RGB), in input order.
        prompts: per sample, the text prompt.
    """

    frames: torch.Tensor
    reference_images: list[list[Image.Image]]
    prompts: list[str]

    def __post_init__(self):
        if self.frames.dtype != torch.uint8 or self.frames.ndim != 5 or self.frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (B, F, H, W, 3), got {self.frames.dtype} {tuple(self.frames.shape)}")
        if not len(self.reference_images) == len(self.prompts) == self.frames.shape[0]:
            raise ValueError("frames, reference_images and prompts must have the same batch size")


def config_field(section, name: str, default):
    """``section.name`` if present and not None, else ``default`` (ConfigDict, dict, namespace or None).

    Rewards read their options through this so configs written before an option existed still work.
    """
    if section is None:
        return default
    if isinstance(section, Mapping):
        value = section.get(name, default)
    else:
        try:
            value = getattr(section, name)
        except (AttributeError, KeyError):
            return default
    return default if value is None else value


RewardFn = Callable[[RewardInputs], dict[str, torch.Tensor]]
RewardFactory = Callable[[object, torch.device], RewardFn]
REGISTRY: dict[str, RewardFactory] = {}


def reward_model_folders(value) -> list[str]:
    """``config.pretrained.reward_model`` as a list of folders: one, or several separated by commas
    (an ensemble, scored by their mean)."""
    return [part.strip() for part in str(value or "").split(",") if part.strip()]


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator adding a factory to the registry under ``name``."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        REGISTRY[name] = factory
        return factory

    return decorator


def import_reward_modules(spec: str) -> None:
    """Import ``config.reward_modules``: comma-separated Python files (a path ending in ``.py``)
    or importable module names, whose ``@register`` factories then join the registry. Each is
    imported once per process (a file is keyed by its resolved path). A missing file or a module
    that fails to import raises ValueError naming the field and the entry, and leaves the
    registry as it was (so a name that clashes with a built-in reward is reported as such)."""
    entries = [part.strip() for part in str(spec or "").split(",") if part.strip()]
    if entries:
        registered_rewards()  # the built-ins first: a clash is then the user's module's error
    for entry in entries:
        before = set(REGISTRY)
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser().resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                name = f"reward_module_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
                if name in sys.modules:
                    continue
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                importlib.import_module(entry)
        except Exception as error:
            for reward in set(REGISTRY) - before:
                del REGISTRY[reward]
            raise ValueError(f"config.reward_modules: could not import {entry!r} ({type(error).__name__}: {error}); "
                             "give a path to a .py file or an importable module name") from error


class CombinedReward:
    """Calls every configured reward and forms ``total = sum_i weight_i * reward_i``.

    Returns ``(scores, seconds)``: ``scores`` has each reward's keys plus ``total``, all
    float32 ``(B,)`` on the CPU; ``seconds`` the wall time of each reward.
    """

    def __init__(self, fns: Mapping[str, RewardFn], weights: Mapping[str, float]):
        self.fns = dict(fns)
        self.weights = dict(weights)

    def to(self, device: torch.device | str) -> CombinedReward:
        """Move the models of the rewards that hold any to ``device`` (``reward_model.offload``):
        a reward fn that can leave the accelerator has a ``to(device)`` attribute; the others
        (pixel statistics, face detectors on the CPU) stay as they are. Call it only while no
        reward is running. Returns self."""
        for fn in self.fns.values():
            if callable(getattr(fn, "to", None)):
                fn.to(device)
        return self

    def __call__(self, inputs: RewardInputs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        batch = inputs.frames.shape[0]
        scores: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        total = torch.zeros(batch)
        for name, fn in self.fns.items():
            start = time.perf_counter()
            out = fn(inputs)
            seconds[name] = time.perf_counter() - start
            if name not in out:
                raise KeyError(f"reward {name!r} returned keys {sorted(out)} but not its own name")
            for key, value in out.items():
                value = torch.as_tensor(value).detach().float().cpu().reshape(-1)
                if value.shape[0] != batch:
                    raise ValueError(f"reward {name!r} key {key!r}: expected {batch} scores, got {value.shape[0]}")
                # Every key, not only the weighted one: sub-scores feed composite modes and logs.
                if not bool(torch.isfinite(value).all()):
                    bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
                    raise FloatingPointError(
                        f"reward {name!r} returned NaN/inf in key {key!r} for samples {bad} (prompts: "
                        f"{[inputs.prompts[i][:60] for i in bad]}); fix the reward or its inputs"
                    )
                scores[key] = value
            total += self.weights[name] * scores[name]
        scores["total"] = total
        return scores, seconds


def registered_rewards() -> tuple[list[str], dict[str, str]]:
    """The names of the built-in and registered rewards, and for each built-in that could not be
    registered (missing optional dependency) the import error. Builds nothing."""
    # Importing the modules registers the built-in rewards.
    from identity_grpo.rewards import composite, copy_paste, facesim, motion, pixel, world  # noqa: F401

    unavailable = {}
    try:
        from identity_grpo.rewards import identity  # noqa: F401
    except ImportError as error:  # the identity reward's optional dependencies are missing
        unavailable["identity"] = str(error)
    return sorted(REGISTRY), unavailable


def unknown_reward_error(names) -> str | None:
    """Why some of ``names`` cannot be built (unknown or unavailable), or None."""
    known, unavailable = registered_rewards()
    problems = [f"{name!r} needs a package that is missing ({unavailable[name]})" for name in names if name in unavailable]
    unknown = sorted(set(names) - set(known) - set(unavailable))
    if unknown:
        problems.append(f"unknown reward(s) {unknown}; registered: {known}")
    return "config.reward_fn: " + "; ".join(problems) if problems else None


def build_reward_fn(config, device: torch.device) -> CombinedReward:
    """Build the rewards named in ``config.reward_fn`` (a mapping name -> weight).

    With ``config.reward_combination.mode`` set to ``"idcrafter"`` or ``"evoid"`` the returned
    reward's ``total`` is that composite instead of the weighted sum (see
    :mod:`identity_grpo.rewards.composite`).
    """
    from identity_grpo.rewards import composite

    weights = dict(config.reward_fn)
    if not weights:
        raise ValueError("config.reward_fn is empty; name at least one reward, e.g. {'ref_similarity': 1.0}")
    import_reward_modules(getattr(config, "reward_modules", ""))
    if error := unknown_reward_error(weights):
        raise ValueError(error)
    combined = CombinedReward({name: REGISTRY[name](config, device) for name in weights}, weights)
    if composite.combination_mode(config) != "sum":
        return composite.CompositeReward(combined, config)
    return combined
