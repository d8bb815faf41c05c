"""Batched scoring with the identity reward model, from video files or in-memory frames.

Both inputs go through the same steps, so the same frames give the same score:

1. sample ``num_frames`` frame indices uniformly (``round(linspace(0, F - 1, n))``, as
   qwen-vl-utils does; qwen-vl-utils rounds ``n`` to an even number);
2. resize the frames (bicubic, antialiased, sides multiples of 28, pixel count bounded by the
   model's ``min/max_frame_pixels``) and each reference image (``min/max_image_pixels``);
3. build the chat text (:func:`vace_reward.prompts.build_reward_text`), run the processor with the
   video metadata (fps, sampled indices) so the video tokens get the right temporal positions,
   and read the head at the reward token.

Video files are read by qwen-vl-utils with decord; in-memory frames (a GRPO rollout) skip the
mp4 round trip.

Command line::

    python -m vace_reward.inference --model DIR --refs a.jpg b.jpg --video v.mp4 --prompt "..."
    python -m vace_reward.inference --model DIR --csv videos.csv --output scores.csv

The CSV has columns ``ref_paths`` (1-4 paths separated by ``;``), ``video`` and ``prompt``;
relative paths are relative to the CSV's folder. The output CSV repeats them and adds one column
per score dimension (``SA``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from identity_grpo.data import MAX_REFERENCES, open_rgb_image, read_csv_rows
from vace_reward.data import probe_video
from vace_reward.model import IdentityRewardModel
from vace_reward.prompts import build_reward_text

logger = logging.getLogger(__name__)


class RewardInputError(ValueError):
    """An input that cannot be scored; the message names the file or sample and what to fix."""


@dataclass
class PreparedSample:
    """One sample ready for the processor.

    Attributes:
        text: chat text with one image pad per reference and one video pad.
        images: the resized reference images (RGB), in input order.
        video: ``(T, 3, H, W)`` float32 in [0, 255], resized, T even.
        video_metadata: ``fps`` of the source, sampled ``frames_indices``, ``total_num_frames``.
    """

    text: str
    images: list[Image.Image]
    video: torch.Tensor
    video_metadata: dict


def load_image(path: str | os.PathLike, where: str = "") -> Image.Image:
    """Open an 8-bit RGB image (16-bit greyscale scaled), or raise :class:`RewardInputError`
    naming the file (and ``where``: file, row, field)."""
    return open_rgb_image(Path(path), where=where, error=RewardInputError)


class IdentityRewardScorer:
    """Scores videos against reference faces, in mini-batches.

    Args:
        model: the reward model (eval mode, on ``device``).
        processor: its ``Qwen2_5_VLProcessor``.
        batch_size: samples per forward pass.
        num_frames, max_frame_pixels: override the model's config (e.g. to score faster); the
            model was trained with its own values.
    """

    def __init__(self, model: IdentityRewardModel, processor, batch_size: int = 4,
                 num_frames: int | None = None, max_frame_pixels: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.config = model.config
        self.num_frames = num_frames or self.config.num_frames
        self.max_frame_pixels = max_frame_pixels or self.config.max_frame_pixels
        self.patch_size = model.backbone.config.vision_config.patch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, base_model: str | None = None, **kwargs) -> IdentityRewardScorer:
        model, processor = IdentityRewardModel.from_pretrained(path, device=device, dtype=dtype, base_model=base_model)
        return cls(model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.reward_head.weight.device

    @property
    def dimensions(self) -> list[str]:
        return list(self.config.dimensions)

    # ------------------------------------------------------------------ public entry points

    def score_videos(self, video_paths: list[str], reference_paths: list[list[str]], prompts: list[str]) -> torch.Tensor:
        """Scores of video files. Returns ``(B, output_dim)`` float32 on the CPU."""
        self.check_batch(len(video_paths), reference_paths, prompts)
        samples = [
            self.prepare(self.read_video_file(path), [load_image(p) for p in refs], prompt)
            for path, refs, prompt in zip(video_paths, reference_paths, prompts)
        ]
        return self._score(samples)

    def score_frames(self, frames: torch.Tensor, reference_images: list[list[Image.Image]], prompts: list[str],
                     fps: float | None = None) -> torch.Tensor:
        """Scores of in-memory videos.

        Args:
            frames: ``(B, F, H, W, 3)`` uint8.
            reference_images: per sample, 1-4 RGB images.
            prompts: per sample, the generation prompt.
            fps: frame rate of the frames; default the model config's ``fps``.

        Returns:
            ``(B, output_dim)`` float32 on the CPU.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise RewardInputError(f"frames must be uint8 (B, F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        self.check_batch(frames.shape[0], reference_images, prompts)
        fps = fps or self.config.fps
        samples = [
            self.prepare(self.sample_frames(video.cpu(), fps, source=f"sample {index}"), refs, prompt)
            for index, (video, refs, prompt) in enumerate(zip(frames, reference_images, prompts))
        ]
        return self._score(samples)

    # ------------------------------------------------------------------ preparation

    def check_batch(self, batch_size: int, references: list[list], prompts: list[str]) -> None:
        if not len(references) == len(prompts) == batch_size:
            raise RewardInputError(
                f"got {batch_size} videos, {len(references)} reference lists and {len(prompts)} prompts; give one of each per sample"
            )
        for index, refs in enumerate(references):
            if not 1 <= len(refs) <= self.config.max_references:
                raise RewardInputError(
                    f"sample {index}: {len(refs)} reference images; the reward model takes 1-{self.config.max_references}"
                )

    def _frame_count(self, total_frames: int, source: str) -> int:
        from qwen_vl_utils.vision_process import smart_nframes

        try:
            return smart_nframes({"nframes": self.num_frames}, total_frames=total_frames, video_fps=1.0)
        except ValueError as error:
            raise RewardInputError(f"{source}: {total_frames} frames, the reward model samples {self.num_frames} ({error})") from error

    def read_video_file(self, path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
        """Sampled and resized frames of a video file, read by qwen-vl-utils with decord."""
        from qwen_vl_utils.vision_process import fetch_video

        path = Path(path)
        if not path.is_file():
            raise RewardInputError(f"video {path} does not exist")
        # Open once with decord first: qwen-vl-utils silently falls back to another reader on
        # errors, which would hide a corrupt file behind a different, confusing error.
        total_frames = probe_video(path, error=RewardInputError)
        self._frame_count(total_frames, source=f"video {path}")
        video, metadata = fetch_video(
            {"video": str(path), "nframes": self.num_frames,
             "min_pixels": self.config.min_frame_pixels, "max_pixels": self.max_frame_pixels},
            image_patch_size=self.patch_size, return_video_metadata=True,
        )
        return video, {k: metadata[k] for k in ("fps", "frames_indices", "total_num_frames")}

    def sample_frames(self, frames: torch.Tensor, fps: float, source: str = "in-memory video") -> tuple[torch.Tensor, dict]:
        """The same sampling and resizing qwen-vl-utils applies to a decoded file (``fetch_video``)."""
        from qwen_vl_utils import vision_process as qvu
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        total_frames, height, width, _ = frames.shape
        num_frames = self._frame_count(total_frames, source)
        indices = torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()
        video = frames[indices].permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        factor = self.patch_size * qvu.SPATIAL_MERGE_SIZE
        min_pixels = self.config.min_frame_pixels
        # qwen-vl-utils caps per-frame pixels by a total-sequence budget; mirrored exactly.
        total_pixels = qvu.MODEL_SEQ_LEN * factor * factor * 0.9
        cap = max(min(qvu.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / num_frames * qvu.FRAME_FACTOR),
                  int(min_pixels * 1.05))
        max_pixels = min(self.max_frame_pixels, cap)
        resized_height, resized_width = qvu.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        video = resize(video, [resized_height, resized_width], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
        return video, {"fps": float(fps), "frames_indices": indices, "total_num_frames": total_frames}

    def prepare(self, video_and_metadata: tuple[torch.Tensor, dict], references: list[Image.Image], prompt: str) -> PreparedSample:
        from qwen_vl_utils.vision_process import fetch_image

        images = [
            fetch_image({"image": image.convert("RGB"), "min_pixels": self.config.min_image_pixels,
                         "max_pixels": self.config.max_image_pixels}, image_patch_size=self.patch_size)
            for image in references
        ]
        text = build_reward_text(self.config.instruction, len(images), prompt, self.config.system_prompt)
        video, metadata = video_and_metadata
        return PreparedSample(text=text, images=images, video=video, video_metadata=metadata)

    def collate(self, samples: list[PreparedSample]) -> dict[str, torch.Tensor]:
        """Processor outputs of a list of samples, on the model's device (pixels in its dtype)."""
        dtype = self.model.backbone.dtype
        return {
            key: value.to(self.device, dtype=dtype if value.is_floating_point() and key.startswith("pixel") else None)
            for key, value in self.process(samples).items()
        }

    def process(self, samples: list[PreparedSample]) -> dict[str, torch.Tensor]:
        """Processor outputs of a list of samples, on the CPU (safe in data-loader workers)."""
        batch = self.processor(
            text=[sample.text for sample in samples],
            images=[image for sample in samples for image in sample.images],
            videos=[sample.video for sample in samples],
            video_metadata=[sample.video_metadata for sample in samples],
            padding=True,
            return_tensors="pt",
            # Frames are already sampled; the processor must not sample again.
            do_sample_frames=False,
            images_kwargs={"size": {"shortest_edge": self.config.min_image_pixels,
                                    "longest_edge": self.config.max_image_pixels}},
            # The frames were resized above within these bounds; the cap qwen-vl-utils applies
            # per frame is already part of that size, so both settings give the same pixels.
            videos_kwargs={"size": {"shortest_edge": self.config.min_frame_pixels, "longest_edge": self.max_frame_pixels},
                           "cap_pixels_per_frame": True},
        )
        return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}

    @torch.inference_mode()
    def _score(self, samples: list[PreparedSample]) -> torch.Tensor:
        scores = [
            self.model(**self.collate(samples[start:start + self.batch_size])).float().cpu()
            for start in range(0, len(samples), self.batch_size)
        ]
        return torch.cat(scores)


# ---------------------------------------------------------------------- command line

def read_score_csv(path: Path, max_references: int = MAX_REFERENCES) -> list[tuple[list[Path], Path, str]]:
    """Rows ``(reference paths, video path, prompt)`` of a scoring CSV, validated up front: every
    image decoded and every video's header read, errors naming file, row and field."""
    rows, checked = [], set()
    for line, row in read_csv_rows(path, ("ref_paths", "video", "prompt"), error=RewardInputError):
        where = f"{path}, row {line}"
        refs = [path.parent / p.strip() for p in row["ref_paths"].split(";") if p.strip()]
        if not 1 <= len(refs) <= max_references:
            raise RewardInputError(f"{where}, field 'ref_paths': {len(refs)} references; give 1-{max_references} separated by ';'")
        for ref in refs:
            if ref not in checked:
                load_image(ref, where=f"{where}, field 'ref_paths'")
                checked.add(ref)
        video = path.parent / row["video"].strip()
        if not row["video"].strip() or not video.is_file():
            raise RewardInputError(f"{where}, field 'video': video {video} does not exist")
        probe_video(video, where=f"{where}, field 'video'", error=RewardInputError)
        rows.append((refs, video, row["prompt"]))
    if not rows:
        raise RewardInputError(f"{path}: no rows")
    return rows


def check_single_video(video: str, refs: list[str]) -> None:
    """The single-video mode's files, checked before the model loads."""
    if len(refs) > MAX_REFERENCES:
        raise RewardInputError(f"--refs: {len(refs)} images; give 1-{MAX_REFERENCES}")
    for ref in refs:
        load_image(ref, where="--refs")
    if not Path(video).is_file():
        raise RewardInputError(f"--video: video {video} does not exist")
    probe_video(video, where="--video", error=RewardInputError)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score how well the people in videos match reference faces.")
    parser.add_argument("--model", required=True, help="reward model folder (standard or upstream release layout)")
    parser.add_argument("--refs", nargs="+", help="1-4 reference images (single-video mode)")
    parser.add_argument("--video", help="video file (single-video mode)")
    parser.add_argument("--prompt", default="", help="generation prompt of the video")
    parser.add_argument("--csv", type=Path, help="CSV with columns ref_paths, video, prompt (batch mode)")
    parser.add_argument("--output", type=Path, help="scores CSV to write in batch mode (default: <csv>_scores.csv)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=None, help="override the model's frame count")
    parser.add_argument("--max-frame-pixels", type=int, default=None, help="override the model's per-frame pixel bound")
    parser.add_argument("--base-model", default=None, help="upstream layout: base Qwen2.5-VL folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.csv is None) == (args.video is None):
        parser.error("give either --video with --refs (one video) or --csv (many videos)")
    if args.video is not None and not args.refs:
        parser.error("--video needs --refs with 1-4 reference images")

    try:
        # The inputs are checked before the model loads (minutes for the released model).
        if args.video is not None:
            check_single_video(args.video, args.refs)
        else:
            rows = read_score_csv(args.csv)
            output = args.output or args.csv.with_name(f"{args.csv.stem}_scores.csv")
            if not output.parent.is_dir():
                raise RewardInputError(f"--output: folder {output.parent} does not exist")
        scorer = IdentityRewardScorer.from_pretrained(
            args.model, device=args.device, base_model=args.base_model, batch_size=args.batch_size,
            num_frames=args.num_frames, max_frame_pixels=args.max_frame_pixels,
        )
        if args.video is not None:
            scores = scorer.score_videos([args.video], [args.refs], [args.prompt])
            for name, value in zip(scorer.dimensions, scores[0].tolist()):
                print(f"{name}\t{value:.6f}")
            return
        scores = scorer.score_videos([r[1] for r in rows], [r[0] for r in rows], [r[2] for r in rows])
    except (RewardInputError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ref_paths", "video", "prompt", *scorer.dimensions])
        for (refs, video, prompt), row_scores in zip(rows, scores.tolist()):
            writer.writerow([";".join(str(r) for r in refs), str(video), prompt, *(f"{s:.6f}" for s in row_scores)])
    print(output)


if __name__ == "__main__":
    main()
