"""Scoring from files vs in-memory frames, the CLI, and bad-input errors."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from vace_reward.data import write_video
from vace_reward.inference import IdentityRewardScorer, RewardInputError, main
from vace_reward.testing import write_tiny_reward_model

FPS = 16.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_reward_model(tmp_path_factory.mktemp("reward") / "tiny")


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return IdentityRewardScorer.from_pretrained(tiny_dir, batch_size=2)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three 9-frame videos (different sizes) written losslessly, and reference images on disk."""
    folder = tmp_path_factory.mktemp("media")
    generator = torch.Generator().manual_seed(0)
    videos, frames = [], []
    for index, (height, width) in enumerate([(32, 32), (48, 32), (40, 64)]):
        video = torch.randint(0, 256, (9, height, width, 3), dtype=torch.uint8, generator=generator)
        videos.append(write_video(folder / f"v{index}.mp4", video, fps=FPS, lossless=True))
        frames.append(video)
    refs = []
    for index in range(4):
        image = torch.randint(0, 256, (36 + 4 * index, 30, 3), dtype=torch.uint8, generator=generator).numpy()
        refs.append(folder / f"ref{index}.png")
        Image.fromarray(image).save(refs[-1])
    return folder, videos, frames, refs


def test_file_and_frame_scores_agree(scorer, media):
    _, videos, frames, refs = media
    reference_paths = [refs[:1], refs[1:3], refs[:4]]
    prompts = ["one", "two", "three"]
    from_files = scorer.score_videos(videos, reference_paths, prompts)
    images = [[Image.open(p).convert("RGB") for p in paths] for paths in reference_paths]
    # Same-size videos stack into one batch; score each on its own here.
    from_frames = torch.cat([scorer.score_frames(f[None], [imgs], [p], fps=FPS) for f, imgs, p in zip(frames, images, prompts)])
    assert from_files.shape == (3, 1)
    torch.testing.assert_close(from_files, from_frames, atol=1e-5, rtol=0)
    # ... and they are not all the same number (the comparison would then be vacuous).
    assert from_files.std() > 1e-4


def test_frame_rate_reaches_the_model(scorer, media):
    """fps sets the temporal positions of the video tokens (``second_per_grid_ts``), so it must
    reach the model: 4 of 9 frames sampled at fps f -> sampled fps 4/9 f -> 2 / (4/9 f) s per grid."""
    _, _, frames, refs = media
    image = Image.open(refs[0]).convert("RGB")
    hidden = {}
    for fps in (2.0, FPS):
        batch = scorer.collate([scorer.prepare(scorer.sample_frames(frames[0], fps, "t"), [image], "x")])
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([2.0 / (4 / 9 * fps)])
        assert batch["mm_token_type_ids"].eq(2).sum() == batch["video_grid_thw"].prod() // 4
        with torch.no_grad():
            hidden[fps] = scorer.model.backbone.model(**batch, use_cache=False).last_hidden_state
    assert (hidden[2.0] - hidden[FPS]).abs().max() > 1e-4


def test_cli_single_video_prints_score(tiny_dir, media, scorer, capsys):
    _, videos, _, refs = media
    main(["--model", str(tiny_dir), "--refs", str(refs[0]), str(refs[1]), "--video", str(videos[1]),
          "--prompt", "two", "--device", "cpu"])
    name, value = capsys.readouterr().out.strip().split("\t")
    expected = scorer.score_videos([videos[1]], [refs[:2]], ["two"])[0, 0].item()
    assert name == "SA" and float(value) == pytest.approx(expected, abs=1e-5)


def test_cli_csv_writes_scores(tiny_dir, media, scorer):
    folder, videos, _, refs = media
    rows = [("ref0.png", "v0.mp4", "one"), ("ref1.png;ref2.png", "v2.mp4", "three")]
    with open(folder / "videos.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ref_paths", "video", "prompt"])
        writer.writerows(rows)
    main(["--model", str(tiny_dir), "--csv", str(folder / "videos.csv"), "--output", str(folder / "scores.csv"),
          "--device", "cpu"])
    with open(folder / "scores.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    expected = scorer.score_videos([videos[0], videos[2]], [refs[:1], refs[1:3]], ["one", "three"])[:, 0]
    assert [row["prompt"] for row in written] == ["one", "three"]
    torch.testing.assert_close(torch.tensor([float(row["SA"]) for row in written]), expected, atol=1e-5, rtol=0)


def test_cli_csv_bad_row_names_row_and_field(tiny_dir, media):
    folder, _, _, _ = media
    with open(folder / "bad.csv", "w", newline="") as handle:
        handle.write("ref_paths,video,prompt\nref0.png,v0.mp4,ok\nref0.png,missing.mp4,bad\n")
    with pytest.raises(SystemExit, match=r"bad.csv, row 3, field 'video'"):
        main(["--model", str(tiny_dir), "--csv", str(folder / "bad.csv"), "--device", "cpu"])


@pytest.mark.parametrize("problem", ["missing_video", "corrupt_video", "missing_image", "corrupt_image",
                                     "no_references", "too_many_references", "too_few_frames"])
def test_bad_inputs_raise_clear_errors(scorer, media, tmp_path, problem):
    _, videos, frames, refs = media
    video, references = videos[0], refs[:1]
    expected = {
        "missing_video": "does not exist", "corrupt_video": "cannot be decoded", "missing_image": "does not exist",
        "corrupt_image": "cannot be read", "no_references": "0 reference images",
        "too_many_references": "5 reference images", "too_few_frames": "frames",
    }[problem]
    if problem == "missing_video":
        video = tmp_path / "nope.mp4"
    elif problem == "corrupt_video":
        video = tmp_path / "corrupt.mp4"
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    elif problem == "missing_image":
        references = [tmp_path / "nope.png"]
    elif problem == "corrupt_image":
        references = [tmp_path / "corrupt.png"]
        references[0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif problem == "no_references":
        references = []
    elif problem == "too_many_references":
        references = refs + refs[:1]
    if problem == "too_few_frames":
        with pytest.raises(RewardInputError, match=expected):
            scorer.score_frames(frames[0][None, :1], [[Image.open(refs[0])]], ["x"])
        return
    with pytest.raises(RewardInputError, match=expected) as error:
        scorer.score_videos([video], [references], ["x"])
    if problem in ("missing_video", "corrupt_video"):
        assert str(video) in str(error.value)
    if problem in ("missing_image", "corrupt_image"):
        assert str(references[0]) in str(error.value)
