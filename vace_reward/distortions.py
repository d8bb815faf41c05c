"""Synthetic preference pairs from real or generated videos, without human labels.

Start from a CSV of videos that show their reference people (columns ``ref_paths``, ``video``,
``prompt``: the scoring CSV of :mod:`vace_reward.inference`, e.g. real clips with face crops, or
generations you trust). Each distortion turns one row into a pair whose preferred video is the
original and whose rejected video shows the reference people worse:

``identity_swap``
    The rejected video is another row's video, scored against this row's references: same
    kind of content, different people. Teaches "whose face is it", the core of the reward. Rows
    whose reference lists are identical are never paired with each other. No new video files.
``face_degradation``
    The original with the face region destroyed: mosaic (pixelation) plus blur inside a box.
    There is no face detector here, so the box is given as fractions of the frame
    (``--face-box``, default the central box ``0.25 0.15 0.75 0.65``, where the faces of
    centred people usually are); outside the box the video is untouched, so only the face carries
    the difference.
``temporal_drift``
    The identity drifts over time: from ``drift_start`` (a fraction of the clip) the frames
    cross-fade linearly into another row's video (other people), ending fully on it. The first
    frames match; a model that only looks at one frame cannot tell the pair apart.
``near_duplicate`` (label ``tie``)
    The original against a copy with a small global brightness change: no identity difference.
    Gives the ties loss (``--loss btt``) examples of ties; off by default.

Which video is A is random (seeded), so position carries no signal. The output folder receives
``pairs.csv`` (a preference CSV, :mod:`vace_reward.data`) and the new videos under ``videos/``.

    python -m vace_reward.distortions --source videos.csv --output-dir data/synthetic_pairs
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from vace_reward.data import PreferencePair, read_video, write_preference_csv, write_video
from vace_reward.inference import read_score_csv

logger = logging.getLogger(__name__)

DISTORTIONS = ("identity_swap", "face_degradation", "temporal_drift", "near_duplicate")
DEFAULT_DISTORTIONS = ("identity_swap", "face_degradation", "temporal_drift")
DEFAULT_FACE_BOX = (0.25, 0.15, 0.75, 0.65)


# ---------------------------------------------------------------------- pure frame operations

def degrade_region(frames: torch.Tensor, box: tuple[float, float, float, float] = DEFAULT_FACE_BOX,
                   block: int = 8, blur_kernel: int = 5) -> torch.Tensor:
    """Pixelate then blur the box ``(x0, y0, x1, y1)`` (fractions of width/height) of every frame.

    Args:
        frames: ``(F, H, W, 3)`` uint8.
        box: the region, as fractions in [0, 1].
        block: mosaic cell size in pixels.
        blur_kernel: side of the box blur applied after the mosaic.

    Returns:
        ``(F, H, W, 3)`` uint8; pixels outside the box are unchanged.
    """
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"face box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
    _, height, width, _ = frames.shape
    left, right = int(round(x0 * width)), max(int(round(x1 * width)), int(round(x0 * width)) + 1)
    top, bottom = int(round(y0 * height)), max(int(round(y1 * height)), int(round(y0 * height)) + 1)
    region = frames[:, top:bottom, left:right].permute(0, 3, 1, 2).float()  # (F, 3, h, w)
    h, w = region.shape[-2:]
    small = F.interpolate(region, size=(max(1, h // block), max(1, w // block)), mode="area")
    mosaic = F.interpolate(small, size=(h, w), mode="nearest")
    blurred = F.avg_pool2d(F.pad(mosaic, [blur_kernel // 2] * 4, mode="replicate"), blur_kernel, stride=1)
    out = frames.clone()
    out[:, top:bottom, left:right] = blurred.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def temporal_drift(frames: torch.Tensor, other: torch.Tensor, drift_start: float = 0.3) -> torch.Tensor:
    """Cross-fade from ``frames`` into ``other`` (resized, time-resampled) from ``drift_start`` on.

    Frame ``t`` is ``(1 - a_t) * frames[t] + a_t * other[t]`` with ``a_t = 0`` up to
    ``drift_start * (F - 1)`` and rising linearly to 1 at the last frame.

    Args:
        frames: ``(F, H, W, 3)`` uint8, the original.
        other: ``(F', H', W', 3)`` uint8, a video of other people.
        drift_start: fraction of the clip before the drift begins, in [0, 1).

    Returns:
        ``(F, H, W, 3)`` uint8.
    """
    if not 0 <= drift_start < 1:
        raise ValueError(f"drift_start must be in [0, 1), got {drift_start}")
    num_frames, height, width, _ = frames.shape
    indices = torch.linspace(0, other.shape[0] - 1, num_frames).round().long()
    other = other[indices].permute(0, 3, 1, 2).float()
    other = F.interpolate(other, size=(height, width), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    position = torch.linspace(0, 1, num_frames) if num_frames > 1 else torch.ones(1)
    alpha = ((position - drift_start) / (1 - drift_start)).clamp(0, 1)[:, None, None, None]
    mixed = (1 - alpha) * frames.float() + alpha * other
    return mixed.round().clamp(0, 255).to(torch.uint8)


def brightness_shift(frames: torch.Tensor, delta: float = 6.0) -> torch.Tensor:
    """Add ``delta`` grey levels everywhere (a change that keeps identity)."""
    return (frames.float() + delta).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------- building pairs

def _other_index(index: int, references: list[tuple], rng: random.Random) -> int | None:
    """A random row whose references differ from row ``index``'s, or None if there is none."""
    candidates = [j for j in range(len(references)) if j != index and references[j] != references[index]]
    return rng.choice(candidates) if candidates else None


def build_synthetic_pairs(
    source_csv: str | Path,
    output_dir: str | Path,
    distortions: tuple[str, ...] = DEFAULT_DISTORTIONS,
    face_box: tuple[float, float, float, float] = DEFAULT_FACE_BOX,
    drift_start: float = 0.3,
    seed: int = 0,
) -> list[PreferencePair]:
    """Write ``output_dir/pairs.csv`` (and new videos) from the rows of ``source_csv``; return the pairs."""
    unknown = sorted(set(distortions) - set(DISTORTIONS))
    if unknown:
        raise ValueError(f"unknown distortion(s) {unknown}; choose from {DISTORTIONS}")
    rows = read_score_csv(Path(source_csv), max_references=4)
    references = [tuple(str(p.resolve()) for p in refs) for refs, _, _ in rows]
    if {"identity_swap", "temporal_drift"} & set(distortions) and len(set(references)) < 2:
        raise ValueError(f"{source_csv}: identity_swap and temporal_drift need rows with at least two different "
                         "reference sets")
    output_dir = Path(output_dir)
    video_dir = output_dir / "videos"
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []

    def add(refs, prompt, chosen: Path, rejected: Path, tie: bool = False) -> None:
        if tie:
            pairs.append(PreferencePair(tuple(refs), prompt, chosen, rejected, 0.5))
        elif rng.random() < 0.5:
            pairs.append(PreferencePair(tuple(refs), prompt, chosen, rejected, 1.0))
        else:
            pairs.append(PreferencePair(tuple(refs), prompt, rejected, chosen, 0.0))

    for index, (refs, video, prompt) in enumerate(rows):
        frames, fps = read_video(video) if set(distortions) - {"identity_swap"} else (None, None)
        for name in distortions:
            if name == "identity_swap":
                other = _other_index(index, references, rng)
                if other is not None:
                    add(refs, prompt, video, rows[other][1])
            elif name == "face_degradation":
                out = write_video(video_dir / f"{index:05d}_face_degradation.mp4", degrade_region(frames, face_box), fps)
                add(refs, prompt, video, out)
            elif name == "temporal_drift":
                other = _other_index(index, references, rng)
                if other is not None:
                    drifted = temporal_drift(frames, read_video(rows[other][1])[0], drift_start)
                    add(refs, prompt, video, write_video(video_dir / f"{index:05d}_temporal_drift.mp4", drifted, fps))
            elif name == "near_duplicate":
                out = write_video(video_dir / f"{index:05d}_near_duplicate.mp4", brightness_shift(frames), fps)
                add(refs, prompt, video, out, tie=True)
    write_preference_csv(output_dir / "pairs.csv", pairs)
    logger.info("wrote %d pairs from %d videos to %s", len(pairs), len(rows), output_dir / "pairs.csv")
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build synthetic identity preference pairs from videos.")
    parser.add_argument("--source", required=True, help="CSV with columns ref_paths, video, prompt")
    parser.add_argument("--output-dir", required=True, help="receives pairs.csv and videos/")
    parser.add_argument("--distortions", nargs="+", default=list(DEFAULT_DISTORTIONS), choices=DISTORTIONS)
    parser.add_argument("--face-box", nargs=4, type=float, default=list(DEFAULT_FACE_BOX),
                        metavar=("X0", "Y0", "X1", "Y1"), help="face region as fractions of width/height")
    parser.add_argument("--drift-start", type=float, default=0.3, help="fraction of the clip before the drift begins")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_synthetic_pairs(args.source, args.output_dir, tuple(args.distortions), tuple(args.face_box),
                          args.drift_start, args.seed)
    print(Path(args.output_dir) / "pairs.csv")


if __name__ == "__main__":
    main()
