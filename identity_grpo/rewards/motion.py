"""``motion``: OpenS2V-Eval's Motion score (Farneback optical flow) as a registered reward.

The number is :func:`identity_grpo.metrics.opens2v.farneback_motion` of each video (every frame,
as OpenS2V; ``config.motion.num_frames`` > 0 samples that many at OpenS2V's indices to save time,
which changes the number). It is in pixels per frame at the video's resolution, not bounded; it
is logged for evaluation (weight 0 in ``config.reward_fn``) to catch a policy that stops moving
while identity rises.
"""

from __future__ import annotations

import torch

from identity_grpo.metrics.opens2v import farneback_motion, sample_indices
from identity_grpo.rewards import RewardInputs, config_field, register


@register("motion")
def motion(config, device: torch.device):
    """Factory (CPU only: OpenCV); the fn returns ``motion`` ``(B,)``."""
    num_frames = int(config_field(config_field(config, "motion", None), "num_frames", 0))
    try:
        import cv2  # noqa: F401
    except ImportError as error:
        raise ImportError("reward 'motion' needs OpenCV: pip install opencv-python, or: "
                          "pip install 'identity-grpo[faces]'") from error

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        frames = inputs.frames.cpu().numpy()
        indices = sample_indices(frames.shape[1], num_frames or None)
        return {"motion": torch.tensor([farneback_motion(video[indices]) for video in frames], dtype=torch.float32)}

    return fn
