"""Reference-to-video prompt datasets: ``<root>/<split>.csv`` with ``ref_paths`` and ``prompt``.

``ref_paths`` holds 1-4 image paths separated by ``;``, relative to ``<root>`` (absolute paths
work too). Every row is checked when the dataset is built, so a bad row stops the run before
any GPU time is spent, with the file, row and field named.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_REFERENCES = 4
REQUIRED_COLUMNS = ("ref_paths", "prompt")


@dataclass(frozen=True)
class PromptItem:
    """One dataset row: a prompt and the paths of its reference faces, in input order."""

    index: int
    prompt: str
    reference_paths: tuple[Path, ...]


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names file, row and field."""


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ReferenceVideoDataset:
    """The validated rows of one split.

    Args:
        root: dataset folder holding ``train.csv`` / ``test.csv`` and the images.
        split: ``"train"`` or ``"test"``.
        max_references: rows with more references are rejected.
        check_images: open every image once up front (cheap, and catches corrupt files early).
    """

    def __init__(self, root: str | Path, split: str, *, max_references: int = MAX_REFERENCES, check_images=True):
        self.root = Path(root)
        self.csv_path = self.root / f"{split}.csv"
        if not self.csv_path.is_file():
            raise DataError(f"{self.csv_path}: not found; the dataset folder needs {split}.csv (see README, 'Data')")
        self.items = self._read(max_references, check_images)

    def _read(self, max_references: int, check_images: bool) -> list[PromptItem]:
        # utf-8-sig: spreadsheets' "CSV UTF-8" export starts with a BOM that would rename the first column.
        with open(self.csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{self.csv_path}, row 1 (header): missing column(s) {missing}; "
                    f"header must contain {REQUIRED_COLUMNS}"
                )
            items = []
            # Row numbers count the header as line 1, as a spreadsheet shows them.
            for line, row in enumerate(reader, start=2):
                where = f"{self.csv_path}, row {line}"
                prompt = (row.get("prompt") or "").strip()
                if not prompt:
                    raise DataError(f"{where}, field 'prompt': empty prompt")
                names = [p.strip() for p in (row.get("ref_paths") or "").split(";") if p.strip()]
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
                    if check_images:
                        try:
                            with Image.open(path) as image:
                                image.verify()
                        except Exception as error:  # PIL raises several unrelated types
                            raise DataError(f"{where}, field 'ref_paths': cannot read image {path}: {error}") from error
                items.append(PromptItem(len(items), prompt, paths))
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
        return [_open_image(path) for path in self.items[index].reference_paths]
