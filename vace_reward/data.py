"""Preference data for the reward model, and video file helpers.

A preference CSV has one row per comparison::

    ref_paths,prompt,video_a,video_b,label
    refs/p1.jpg;refs/p2.jpg,"two people walk",videos/1a.mp4,videos/1b.mp4,A

``ref_paths`` holds 1-4 images separated by ``;``; ``label`` is ``A`` (video A shows the
reference people better), ``B`` or ``tie``. Relative paths are relative to the CSV's folder.
Every row is checked when the dataset is built (columns, field count, label, reference count,
every image decoded, every video's header read), so a bad row stops training before the model is
loaded, with file, row and field named.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from identity_grpo.data import open_rgb_image, read_csv_rows

LABELS = {"a": 1.0, "b": 0.0, "tie": 0.5}
PAIR_COLUMNS = ("ref_paths", "prompt", "video_a", "video_b", "label")


class PreferenceDataError(ValueError):
    """A preference CSV or row that cannot be used; the message names file, row and field."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison.

    Attributes:
        reference_paths: the 1-4 reference faces, in input order.
        prompt: the generation prompt of both videos.
        video_a, video_b: the two videos.
        target: P(A preferred): 1.0 for ``A``, 0.0 for ``B``, 0.5 for ``tie``.
    """

    reference_paths: tuple[Path, ...]
    prompt: str
    video_a: Path
    video_b: Path
    target: float

    @property
    def is_tie(self) -> bool:
        return self.target == 0.5


def read_preference_csv(path: str | Path, max_references: int = 4, *, check_files: bool = True) -> list[PreferencePair]:
    """Validated rows of a preference CSV (see the module docstring).

    With ``check_files`` every reference image is decoded and every video's header is read
    once, so a corrupt file stops the run before the model loads, naming file, row and field.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference CSV not found")
    pairs, checked = [], set()
    for line, row in read_csv_rows(path, PAIR_COLUMNS, error=PreferenceDataError):
        where = f"{path}, row {line}"
        label = row["label"].strip().lower()
        if label not in LABELS:
            raise PreferenceDataError(f"{where}, field 'label': {row['label']!r}; use A, B or tie")
        refs = [path.parent / p.strip() for p in row["ref_paths"].split(";") if p.strip()]
        if not 1 <= len(refs) <= max_references:
            raise PreferenceDataError(
                f"{where}, field 'ref_paths': {len(refs)} references; give 1-{max_references} separated by ';'"
            )
        for ref in refs:
            if not ref.is_file():
                raise PreferenceDataError(f"{where}, field 'ref_paths': image {ref} does not exist")
            if check_files and ref not in checked:
                open_rgb_image(ref, where=f"{where}, field 'ref_paths'", error=PreferenceDataError)
                checked.add(ref)
        videos = {}
        for field in ("video_a", "video_b"):
            video = path.parent / row[field].strip()
            if not row[field].strip() or not video.is_file():
                raise PreferenceDataError(f"{where}, field '{field}': video {video} does not exist")
            if check_files and video not in checked:
                probe_video(video, where=f"{where}, field '{field}'", error=PreferenceDataError)
                checked.add(video)
            videos[field] = video
        pairs.append(PreferencePair(tuple(refs), row["prompt"].strip(), videos["video_a"], videos["video_b"],
                                    LABELS[label]))
    if not pairs:
        raise PreferenceDataError(f"{path}: no rows")
    return pairs


def probe_video(path: str | Path, *, where: str = "", error: type[ValueError] = PreferenceDataError) -> int:
    """Open a video's container and index with decord (what the scorer reads it with) and return its
    frame count; raise ``error`` naming ``where`` and the file if it cannot be decoded or is empty.
    Cheap: no frame is decoded."""
    import decord

    prefix = f"{where}: " if where else ""
    try:
        count = len(decord.VideoReader(str(path)))
    except Exception as decord_error:  # decord raises its own DECORDError and RuntimeError
        raise error(f"{prefix}video {path} cannot be decoded ({decord_error}); re-encode it "
                    "(e.g. H.264 mp4)") from decord_error
    if count < 1:
        raise error(f"{prefix}video {path} has no frames; re-encode it (e.g. H.264 mp4)")
    return count


def write_preference_csv(path: str | Path, pairs: list[PreferencePair]) -> Path:
    """Write pairs as a preference CSV; paths are written relative to the CSV's folder when possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def relative(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(path.parent.resolve()))
        except ValueError:
            return str(Path(p).resolve())

    names = {1.0: "A", 0.0: "B", 0.5: "tie"}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIR_COLUMNS)
        for pair in pairs:
            writer.writerow([";".join(relative(r) for r in pair.reference_paths), pair.prompt,
                             relative(pair.video_a), relative(pair.video_b), names[pair.target]])
    return path


# ---------------------------------------------------------------------- video files

def read_video(path: str | Path) -> tuple[torch.Tensor, float]:
    """All frames of a video file as ``(F, H, W, 3)`` uint8, and its frame rate (decord)."""
    import decord

    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    return torch.from_numpy(frames), float(reader.get_avg_fps())


def write_video(path: str | Path, frames: torch.Tensor | np.ndarray, fps: float = 16.0, lossless: bool = False) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames as an H.264 mp4.

    ``lossless=True`` uses RGB H.264 at CRF 0 (libx264rgb), which decodes back bit-exactly (tests
    compare file and in-memory scores with it), encoded in process with PyAV: about 0.01 s a small
    video, where starting an ffmpeg process costs about 0.14 s (what made writing the tiny world's
    preference pairs slow). The default is ordinary H.264 at CRF 18 (imageio-ffmpeg).
    """
    frames = np.ascontiguousarray(torch.as_tensor(frames).cpu().numpy())
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    if lossless:
        from fractions import Fraction

        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
            stream.options = {"crf": "0", "preset": "ultrafast"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder
        return path
    import imageio_ffmpeg

    # 4:2:0 chroma needs even sides; odd-sized videos keep full chroma instead.
    chroma = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, macro_block_size=1, quality=None,
                                         ffmpeg_log_level="error", codec="libx264", pix_fmt_out=chroma,
                                         output_params=["-crf", "18"])
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()
    return path
