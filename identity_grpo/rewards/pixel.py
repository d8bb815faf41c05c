"""Cheap, deterministic pixel-space rewards for tests, the quick start and sanity runs.

Neither measures identity. They compare a video with its references at 8x8 pixels, a smooth
signal that even a tiny random model can learn, to prove the GRPO loop end to end.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from identity_grpo.rewards import RewardInputs, register

_SIZE = 8


def _reference_thumbnail(images: list[Image.Image], size: int) -> torch.Tensor:
    """Mean of the references area-resized to ``size x size``, as ``(3, S, S)`` in [0, 1]."""
    thumbs = [
        F.adaptive_avg_pool2d(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float(), size)
        for image in images
    ]
    return torch.stack(thumbs).mean(0) / 255.0


def _thumbnails(inputs: RewardInputs, size: int = _SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, F, 3, S, S)`` frame thumbnails and ``(B, 1, 3, S, S)`` reference targets in [0, 1]."""
    frames = inputs.frames.float().div(255.0)  # (B, F, H, W, 3)
    b, f, h, w, _ = frames.shape
    frames = frames.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w)
    small = F.adaptive_avg_pool2d(frames, size).reshape(b, f, 3, size, size)
    target = torch.stack([_reference_thumbnail(refs, size) for refs in inputs.reference_images])
    return small, target[:, None]


def _chroma(rgb: torch.Tensor) -> torch.Tensor:
    """Colour minus its grey level (per pixel): hue and saturation without brightness."""
    return rgb - rgb.mean(dim=-3, keepdim=True)


@register("ref_similarity")
def ref_similarity(config, device):
    """``1 - mean |frame - references|`` over RGB at 8x8 pixels, averaged over frames: in [0, 1]."""

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        small, target = _thumbnails(inputs)
        return {"ref_similarity": 1.0 - (small - target).abs().mean(dim=(1, 2, 3, 4))}

    return fn


@register("ref_tone")
def ref_tone(config, device):
    """How far the video's mean colour tone points in the direction of the references' tone.

    ``<chroma(mean frame colour), chroma(mean reference colour) / |chroma(mean reference colour)|>``
    where chroma is the colour minus its grey level: positive when the video is tinted like the
    references' skin and hair, negative when tinted the other way, 0 for a grey video.
    Brightness and layout are ignored. Small random decoders can hardly change their
    brightness or layout (their normalisation layers fix them) but readily change hue, so this
    is the reward that the tiny CPU runs learn clearly.
    """

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        small, target = _thumbnails(inputs, size=1)  # (B, F, 3, 1, 1), (B, 1, 3, 1, 1)
        video_tone = _chroma(small).mean(dim=(1, 3, 4))  # (B, 3)
        reference_tone = _chroma(target).mean(dim=(1, 3, 4))
        direction = reference_tone / reference_tone.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return {"ref_tone": (video_tone * direction).sum(dim=-1)}

    return fn


@register("brightness")
def brightness(config, device):
    """Mean pixel value of the video in [0, 1] (all frames, all channels)."""

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        return {"brightness": inputs.frames.float().mean(dim=(1, 2, 3, 4)) / 255.0}

    return fn


@register("redness")
def redness(config, device):
    """How red the video is: mean of ``R - (G + B) / 2`` over pixels and frames, in [-1, 1]."""

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        rgb = inputs.frames.float().mean(dim=(1, 2, 3)) / 255.0  # (B, 3)
        return {"redness": rgb[:, 0] - rgb[:, 1:].mean(dim=1)}

    return fn


@register("rightward")
def rightward(config, device):
    """Where the foreground is: the mean horizontal position, in [0, 1] (1 = the right edge), of
    each frame's pixels weighted by their distance from the frame's median colour (the
    background of a plain scene), averaged over frames."""

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        frames = inputs.frames.float()  # (B, F, H, W, 3)
        b, f, h, w, _ = frames.shape
        median = frames.reshape(b, f, h * w, 3).median(dim=2).values[:, :, None, None]
        weight = (frames - median).norm(dim=-1).sum(dim=2)  # (B, F, W): foreground mass per column
        x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        centre = (weight * x).sum(-1) / weight.sum(-1).clamp_min(1e-6)
        return {"rightward": centre.mean(dim=1)}

    return fn
