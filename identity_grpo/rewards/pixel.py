"""Cheap, deterministic pixel-space rewards for tests, the quick start and sanity runs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from identity_grpo.rewards import RewardInputs, register

_SIZE = 8


def _reference_thumbnail(images: list[Image.Image]) -> torch.Tensor:
    """Mean of the references resized to ``_SIZE x _SIZE``, as ``(3, S, S)`` in [0, 1]."""
    thumbs = [
        F.adaptive_avg_pool2d(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float(), _SIZE)
        for image in images
    ]
    return torch.stack(thumbs).mean(0) / 255.0


@register("ref_similarity")
def ref_similarity(config, device):
    """``1 - mean |frame - references|`` at 8x8 pixels, averaged over frames: in [0, 1].

    Not an identity measure: a smooth, cheap signal that a tiny random model can learn, used to
    prove the GRPO loop end to end.
    """

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        frames = inputs.frames.float().div(255.0)  # (B, F, H, W, 3)
        b, f, h, w, _ = frames.shape
        frames = frames.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w)
        small = F.adaptive_avg_pool2d(frames, _SIZE).reshape(b, f, 3, _SIZE, _SIZE)
        target = torch.stack([_reference_thumbnail(refs) for refs in inputs.reference_images])
        distance = (small - target[:, None]).abs().mean(dim=(1, 2, 3, 4))
        return {"ref_similarity": 1.0 - distance}

    return fn
