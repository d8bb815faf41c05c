"""Reference-to-video prompt datasets: ``<root>/<split>.csv`` with ``ref_paths`` and ``prompt``.

``ref_paths`` holds 1-4 image paths separated by ``;``, relative to ``<root>`` (absolute paths
work too). Every row is checked when the dataset is built, so a bad row stops the run before
any GPU time is spent, with the file, row and field named.

Every read of user data (CSV files and reference images, here and in :mod:`vace_reward`) goes
through :func:`read_csv_rows` and :func:`open_rgb_image`, so every failure names the file, the
row and the field, and the start-up check loads images exactly as training does.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_REFERENCES = 4
REQUIRED_COLUMNS = ("ref_paths", "prompt")
# Smaller images hold no usable face, and qwen-vl-utils (the reward model's image resizing)
# refuses aspect ratios above 200 only once the model is loaded.
MIN_REFERENCE_SIDE = 4
MAX_REFERENCE_ASPECT = 200
# 16-bit modes Pillow gives PNG/TIFF greyscale; ``convert("RGB")`` clips them (a white image).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class PromptItem:
    """One dataset row: a prompt and the paths of its reference faces, in input order."""

    index: int
    prompt: str
    reference_paths: tuple[Path, ...]
    row: int = 0  # its row in the CSV (header = 1), for error messages


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names file, row and field."""


def read_csv_rows(path: Path, required: Sequence[str], *, error: type[ValueError] = DataError
                  ) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, row)`` for every data row of a CSV, the header counted as row 1 (as a
    spreadsheet shows it). Raises ``error`` naming the file (and row) for a missing file or
    column, bytes that are not UTF-8, a row with more or fewer fields than the header (an
    unquoted comma would otherwise silently cut a prompt short) and an over-long field."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: CSV not found")
    data = path.read_bytes()
    try:
        # utf-8-sig: spreadsheets' "CSV UTF-8" export starts with a BOM that would rename the first column.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as decode_error:
        line = data[:decode_error.start].count(b"\n") + 1
        raise error(f"{path}, line {line}: not UTF-8 text ({decode_error.reason} at byte {decode_error.start}); "
                    "save the CSV as UTF-8 (in a spreadsheet: 'CSV UTF-8')") from decode_error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    number = 1  # the row last read; the header is row 1
    try:
        header = reader.fieldnames or []
        missing = [column for column in required if column not in header]
        if missing:
            raise error(f"{path}, row 1 (header): missing column(s) {missing}; header must contain {tuple(required)}")
        for row in reader:
            number += 1
            where = f"{path}, row {number}"
            if None in row:  # DictReader's key for fields beyond the header
                raise error(
                    f"{where}: {len(header) + len(row[None])} fields but the header has {len(header)} "
                    f"({', '.join(header)}); a comma inside a field needs the field in double quotes, e.g. "
                    '"a woman, smiling, walks" (a double quote inside it is written twice: "")')
            short = [column for column in required if row[column] is None]
            if short:
                raise error(f"{where}, field '{short[0]}': the row has fewer fields than the header "
                            f"({', '.join(header)}); add the missing field(s)")
            yield number, row
    except csv.Error as csv_error:
        # The only csv.Error a DictReader raises on text is a field over the module's size limit,
        # usually an unclosed double quote that runs to the end of the file.
        raise error(f"{path}, row {number + 1}: {csv_error}; look for an unclosed double quote, or shorten "
                    f"the field below {csv.field_size_limit()} characters") from csv_error


def open_rgb_image(path: Path, *, where: str = "", error: type[ValueError] = DataError) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded. 16-bit greyscale is scaled to 8 bits;
    images Pillow cannot decode, 32-bit images (their range is unknown) and images too small
    or too narrow to be a reference raise ``error`` naming ``where`` (file, row, field) and the file."""
    prefix = f"{where}: " if where else ""
    path = Path(path)
    if not path.is_file():
        raise error(f"{prefix}image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # the whole file: verify() passes truncated pixel data
            rgb = _to_rgb(image)
    except _UnsupportedMode as mode_error:
        raise error(f"{prefix}image {path}: {mode_error}; save it as an 8-bit RGB PNG or JPEG") from None
    # Pillow's decoders raise all of these (DecompressionBombError for absurd pixel counts).
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as pil_error:
        raise error(f"{prefix}image {path} cannot be read ({pil_error}); replace it with a valid PNG or JPEG") from pil_error
    width, height = rgb.size
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise error(f"{prefix}image {path} is {width}x{height} pixels, too small to be a reference; give at "
                    f"least {MIN_REFERENCE_SIDE} pixels a side (a face crop of 100+ pixels works best)")
    if max(width, height) > MAX_REFERENCE_ASPECT * min(width, height):
        raise error(f"{prefix}image {path} is {width}x{height} pixels, aspect ratio above {MAX_REFERENCE_ASPECT} "
                    "(the reward model's limit); crop it to the face")
    return rgb


class _UnsupportedMode(Exception):
    pass


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        # 65535 / 257 = 255 exactly: full scale maps to full scale.
        pixels = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
        return Image.fromarray(np.round(pixels).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "32-bit float"
        raise _UnsupportedMode(f"{kind} pixels (mode {image.mode}) have no known range")
    return image.convert("RGB")


class ReferenceVideoDataset:
    """The validated rows of one split.

    Args:
        root: dataset folder holding ``train.csv`` / ``test.csv`` and the images.
        split: ``"train"`` or ``"test"``.
        max_references: rows with more references are rejected.
        check_images: decode every image once up front, as training will (catches corrupt,
            truncated, 32-bit and too-small files before any model loads).
    """

    def __init__(self, root: str | Path, split: str, *, max_references: int = MAX_REFERENCES, check_images=True):
        self.root = Path(root)
        self.csv_path = self.root / f"{split}.csv"
        if not self.csv_path.is_file():
            raise DataError(f"{self.csv_path}: not found; the dataset folder needs {split}.csv (see README, 'Data')")
        self.items = self._read(max_references, check_images)

    def _read(self, max_references: int, check_images: bool) -> list[PromptItem]:
        items, checked = [], set()
        for line, row in read_csv_rows(self.csv_path, REQUIRED_COLUMNS):
            where = f"{self.csv_path}, row {line}"
            prompt = row["prompt"].strip()
            if not prompt:
                raise DataError(f"{where}, field 'prompt': empty prompt")
            names = [p.strip() for p in row["ref_paths"].split(";") if p.strip()]
            if not names:
                raise DataError(f"{where}, field 'ref_paths': no reference image; give 1-{max_references} paths")
            if len(names) > max_references:
                raise DataError(
                    f"{where}, field 'ref_paths': {len(names)} references, at most {max_references} are supported"
                )
            paths = tuple(self.root / name for name in names)
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{where}, field 'ref_paths': image {path} does not exist")
                if check_images and path not in checked:  # rows often share a face: decode it once
                    open_rgb_image(path, where=f"{where}, field 'ref_paths'")
                    checked.add(path)
            items.append(PromptItem(len(items), prompt, paths, line))
        if not items:
            raise DataError(f"{self.csv_path}: no rows")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    @property
    def reference_counts(self) -> list[int]:
        return [len(item.reference_paths) for item in self.items]

    def load_references(self, index: int) -> list[Image.Image]:
        """The RGB reference images of row ``index``, in CSV order."""
        item = self.items[index]
        return [open_rgb_image(path, where=f"{self.csv_path}, row {item.row}, field 'ref_paths'")
                for path in item.reference_paths]
