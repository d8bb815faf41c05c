"""The reference-video CSV dataset: valid rows parse, every bad row names file, row and field."""

import pytest
from PIL import Image

from identity_grpo.data import DataError, ReferenceVideoDataset

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255), "d.png": (9, 9, 9), "e.png": (7, 7, 7)}


@pytest.fixture
def root(tmp_path):
    for name, colour in COLOURS.items():
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "faces").mkdir()
    Image.new("L", (6, 4), 128).save(tmp_path / "faces" / "grey.jpg")  # not RGB on disk
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path


def _write(root, text, split="train"):
    path = root / f"{split}.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_rows_parse_with_paths_in_order(root):
    _write(
        root,
        "ref_paths,prompt\n"
        "c.png;a.png,two people talk\n"
        "faces/grey.jpg, a man walks \n"
        "b.png;a.png;c.png;d.png,four friends\n",
    )
    dataset = ReferenceVideoDataset(root, "train")
    assert len(dataset) == 3
    assert [item.index for item in dataset.items] == [0, 1, 2]
    assert dataset[0].reference_paths == (root / "c.png", root / "a.png")
    assert dataset[1].prompt == "a man walks"
    assert dataset[2].reference_paths == tuple(root / n for n in ("b.png", "a.png", "c.png", "d.png"))
    assert dataset.reference_counts == [2, 1, 4]
    images = dataset.load_references(0)
    assert [image.getpixel((0, 0)) for image in images] == [(0, 0, 255), (255, 0, 0)]
    grey = dataset.load_references(1)[0]
    assert grey.mode == "RGB" and grey.size == (6, 4) and grey.getpixel((0, 0)) == (128, 128, 128)


def test_quoted_prompt_with_commas_and_extra_columns_survive(root):
    _write(root, 'id,prompt,ref_paths\n7,"A woman, smiling, waves ""hello""",b.png\n')
    item = ReferenceVideoDataset(root, "train")[0]
    assert item.prompt == 'A woman, smiling, waves "hello"'
    assert item.reference_paths == (root / "b.png",)


def test_absolute_reference_paths_work(root):
    _write(root, f"ref_paths,prompt\n{root / 'a.png'},a man\n", split="test")
    assert ReferenceVideoDataset(root, "test")[0].reference_paths == (root / "a.png",)


GOOD = "a.png,a man smiles\n"


@pytest.mark.parametrize(
    "bad_row, field, detail",
    [
        ("a.png,   \n", "prompt", "empty prompt"),
        ("a.png,\n", "prompt", "empty prompt"),
        (",a man\n", "ref_paths", "no reference"),
        ("; ;,a man\n", "ref_paths", "no reference"),
        ("a.png;b.png;c.png;d.png;e.png,five people\n", "ref_paths", "5 references"),
        ("a.png;missing.png,a man\n", "ref_paths", "missing.png"),
        ("corrupt.png,a man\n", "ref_paths", "corrupt.png"),
    ],
)
def test_bad_row_names_file_row_and_field(root, bad_row, field, detail):
    # The bad row is the third data row: row 4 counting the header as row 1.
    csv_path = _write(root, "ref_paths,prompt\n" + GOOD + GOOD + bad_row + GOOD)
    with pytest.raises(DataError) as error:
        ReferenceVideoDataset(root, "train")
    message = str(error.value)
    assert str(csv_path) in message
    assert "row 4," in message
    assert f"'{field}'" in message
    assert detail in message


@pytest.mark.parametrize("header, missing", [("prompt\n", "ref_paths"), ("ref_paths,caption\n", "prompt")])
def test_missing_column_names_file_header_row_and_field(root, header, missing):
    csv_path = _write(root, header + "a.png\n")
    with pytest.raises(DataError) as error:
        ReferenceVideoDataset(root, "train")
    message = str(error.value)
    assert str(csv_path) in message
    assert "row 1" in message
    assert f"'{missing}'" in message


def test_missing_csv_and_empty_csv_raise(root):
    with pytest.raises(DataError, match="test.csv"):
        ReferenceVideoDataset(root, "test")
    csv_path = _write(root, "ref_paths,prompt\n")
    with pytest.raises(DataError, match="no rows") as error:
        ReferenceVideoDataset(root, "train")
    assert str(csv_path) in str(error.value)


def test_more_references_than_configured_maximum_raise(root):
    _write(root, "ref_paths,prompt\na.png;b.png,two people\n")
    with pytest.raises(DataError, match="2 references, at most 1"):
        ReferenceVideoDataset(root, "train", max_references=1)


def test_utf8_byte_order_mark_is_ignored(root):
    # Spreadsheet "CSV UTF-8" exports start with a BOM, which must not hide the first column's name.
    (root / "train.csv").write_bytes("ref_paths,prompt\na.png,une femme sourit\n".encode("utf-8-sig"))
    assert ReferenceVideoDataset(root, "train")[0].reference_paths == (root / "a.png",)
