"""The ``identity`` reward: the Qwen2.5-VL identity reward model on in-memory rollout frames.

Config fields read (all but the first optional; missing ones take the defaults below):

- ``config.pretrained.reward_model``: reward model folder, standard layout or the upstream
  release layout (see ``docs/reward_model.md``); or several folders separated by commas, an
  ensemble whose score is the mean of its members' scores (each member's own score is logged
  as ``identity/model<i>``): the usual guard against a policy climbing one model's mistakes
  (on the tiny world it did not make identity learning reliable: docs/tiny_world.md).
- ``config.pretrained.build_tiny`` (False): if true and the folder does not exist, write a tiny
  random reward model there first (offline quick start and tests only).
- ``config.reward_model.batch_size`` (4): videos per forward pass of the reward model.
- ``config.reward_model.num_frames`` (0 = the model's own, 5 for the released model): frames
  sampled from each video.
- ``config.reward_model.max_frame_pixels`` (0 = the model's own): per-frame pixel bound.
- ``config.reward_model.fps`` (0 = the model's own): frame rate declared for the rollout frames;
  ``config/base.py`` sets 10, the rate at which upstream writes its rollouts.
- ``config.reward_model.mp4_roundtrip`` (False): score what upstream scores, the rollout written
  to mp4 by diffusers' ``export_to_video`` (at ``fps``, quality 7.5) and decoded again.
- ``config.reward_model.base_model`` ("" = as recorded): base Qwen2.5-VL for the upstream layout.

Returns ``{"identity": (B,)}`` (the first score dimension, subject alignment); models with more
dimensions add ``identity/<dimension>`` for each (ensemble means, dimension by dimension).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import torch
from PIL import Image

from identity_grpo.rewards import RewardInputs, config_field, register, reward_model_folders
from vace_reward.inference import IdentityRewardScorer

logger = logging.getLogger(__name__)


def write_upstream_mp4(frames: torch.Tensor, path: Path, fps: float) -> Path:
    """``(F, H, W, 3)`` uint8 frames -> mp4 as upstream writes a rollout: diffusers'
    ``export_to_video`` with PIL frames, quality 7.5 (libx264 through imageio)."""
    from diffusers.utils import export_to_video

    export_to_video([Image.fromarray(frame) for frame in frames.cpu().numpy()], str(path), fps=fps, quality=7.5)
    return path


def score_via_mp4(scorer: IdentityRewardScorer, inputs: RewardInputs, fps: float) -> torch.Tensor:
    """Upstream's scoring path: each video through an mp4 file and back (the references are
    written losslessly as PNG, so only the video goes through the codec). ``(B, N)`` scores."""
    with tempfile.TemporaryDirectory(prefix="identity_reward_") as folder:
        folder = Path(folder)
        videos, references = [], []
        for index, (frames, images) in enumerate(zip(inputs.frames, inputs.reference_images)):
            videos.append(str(write_upstream_mp4(frames, folder / f"{index}.mp4", fps)))
            references.append([])
            for ref_index, image in enumerate(images):
                image.save(folder / f"{index}_{ref_index}.png")
                references[-1].append(str(folder / f"{index}_{ref_index}.png"))
        return scorer.score_videos(videos, references, inputs.prompts)


@register("identity")
def identity(config, device: torch.device):
    """Factory: load the reward model once; the returned fn scores a batch of rollouts."""
    pretrained = config_field(config, "pretrained", None)
    paths = reward_model_folders(config_field(pretrained, "reward_model", ""))
    if not paths:
        raise ValueError("config.pretrained.reward_model is empty; set it to the identity reward model folder")
    options = config_field(config, "reward_model", None)
    scorers = []
    for path in paths:
        if config_field(pretrained, "build_tiny", False) and not Path(path).exists():
            from vace_reward.testing import write_tiny_reward_model

            logger.warning("writing a tiny RANDOM reward model to %s (pretrained.build_tiny is set)", path)
            write_tiny_reward_model(path)
        scorers.append(IdentityRewardScorer.from_pretrained(
            path,
            device=device,
            base_model=config_field(options, "base_model", "") or None,
            batch_size=int(config_field(options, "batch_size", 4)),
            num_frames=int(config_field(options, "num_frames", 0)) or None,
            max_frame_pixels=int(config_field(options, "max_frame_pixels", 0)) or None,
        ))
    dimensions = scorers[0].dimensions
    if any(scorer.dimensions != dimensions for scorer in scorers):
        raise ValueError(f"config.pretrained.reward_model: the ensemble's models score different dimensions "
                         f"({[scorer.dimensions for scorer in scorers]}); use models of one kind")
    fps = float(config_field(options, "fps", 0)) or scorers[0].config.fps
    mp4_roundtrip = bool(config_field(options, "mp4_roundtrip", False))
    logger.info("identity reward: %s on %s, dimensions %s, %d frames, %s fps%s", ", ".join(paths), device, dimensions,
                scorers[0].num_frames, fps, ", through mp4 as upstream" if mp4_roundtrip else "")
    # The GRPO loop scores in a worker thread while the next rollout runs; the lock keeps two
    # overlapping calls (should the caller ever make them) from interleaving on the model.
    lock = threading.Lock()

    def score(scorer: IdentityRewardScorer, inputs: RewardInputs) -> torch.Tensor:
        if mp4_roundtrip:
            return score_via_mp4(scorer, inputs, fps)
        return scorer.score_frames(inputs.frames, inputs.reference_images, inputs.prompts, fps=fps)  # (B, N)

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        with lock:
            members = [score(scorer, inputs) for scorer in scorers]
        scores = torch.stack(members).mean(0)
        out = {"identity": scores[:, 0]}
        if len(dimensions) > 1:
            out.update({f"identity/{name}": scores[:, index] for index, name in enumerate(dimensions)})
        if len(members) > 1:
            out.update({f"identity/model{index}": member[:, 0] for index, member in enumerate(members)})
        return out

    def move(device) -> None:
        """The reward model to ``device`` (``reward_model.offload``); scores follow the weights."""
        with lock:
            for scorer in scorers:
                scorer.model.to(device)

    fn.to = move
    return fn
