"""The ``identity`` reward: the Qwen2.5-VL identity reward model on in-memory rollout frames.

Config fields read (all but the first optional; missing ones take the defaults below):

- ``config.pretrained.reward_model``: reward model folder, standard layout or the upstream
  release layout (see ``docs/reward_model.md``).
- ``config.pretrained.build_tiny`` (False): if true and the folder does not exist, write a tiny
  random reward model there first (offline quick start and tests only).
- ``config.reward_model.batch_size`` (4): videos per forward pass of the reward model.
- ``config.reward_model.num_frames`` (0 = the model's own, 5 for the released model): frames
  sampled from each video.
- ``config.reward_model.max_frame_pixels`` (0 = the model's own): per-frame pixel bound.
- ``config.reward_model.fps`` (0 = the model's own, 16): frame rate of the rollout videos.
- ``config.reward_model.base_model`` ("" = as recorded): base Qwen2.5-VL for the upstream layout.

Returns ``{"identity": (B,)}`` (the first score dimension, subject alignment); models with more
dimensions add ``identity/<dimension>`` for each.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from identity_grpo.rewards import RewardInputs, register
from vace_reward.inference import IdentityRewardScorer

logger = logging.getLogger(__name__)


def _field(section, name: str, default):
    """``section.name`` if present, else ``default`` (works for ConfigDict, dict and None)."""
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(name, default)
    try:
        value = getattr(section, name)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


@register("identity")
def identity(config, device: torch.device):
    """Factory: load the reward model once; the returned fn scores a batch of rollouts."""
    pretrained = _field(config, "pretrained", None)
    path = _field(pretrained, "reward_model", "")
    if not path:
        raise ValueError("config.pretrained.reward_model is empty; set it to the identity reward model folder")
    if _field(pretrained, "build_tiny", False) and not Path(path).exists():
        from vace_reward.testing import write_tiny_reward_model

        logger.warning("writing a tiny RANDOM reward model to %s (pretrained.build_tiny is set)", path)
        write_tiny_reward_model(path)

    options = _field(config, "reward_model", None)
    scorer = IdentityRewardScorer.from_pretrained(
        path,
        device=device,
        base_model=_field(options, "base_model", "") or None,
        batch_size=int(_field(options, "batch_size", 4)),
        num_frames=int(_field(options, "num_frames", 0)) or None,
        max_frame_pixels=int(_field(options, "max_frame_pixels", 0)) or None,
    )
    fps = float(_field(options, "fps", 0)) or None
    dimensions = scorer.dimensions
    logger.info("identity reward: %s on %s, dimensions %s, %d frames", path, device, dimensions, scorer.num_frames)
    # The GRPO loop scores in a worker thread while the next rollout runs; the lock keeps two
    # overlapping calls (should the caller ever make them) from interleaving on the model.
    lock = threading.Lock()

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        with lock:
            scores = scorer.score_frames(inputs.frames, inputs.reference_images, inputs.prompts, fps=fps)  # (B, N)
        out = {"identity": scores[:, 0]}
        if len(dimensions) > 1:
            out.update({f"identity/{name}": scores[:, index] for index, name in enumerate(dimensions)})
        return out

    return fn
