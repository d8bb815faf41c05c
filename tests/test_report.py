"""The run report (``python -m identity_grpo.report``): the data it reads from a real tiny run and a
real test-script folder, the page it writes (escaped, relative links only), its one-line errors,
the videos sent to the trackers, and headless Chromium opening the page from disk.

One tiny training run (2 epochs, tensorboard + offline wandb) and one batch-inference run (base vs
a random LoRA, in a subprocess started alongside) are shared by the module."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from identity_grpo import report
from identity_grpo.data import ReferenceVideoDataset

ROOT = Path(__file__).resolve().parents[1]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def inference_launch(tmp_path_factory, tiny_vace_dir, dataset_dir):
    """``test_wan2_1_vace.py`` on the tiny models, base model vs a random LoRA, started in a
    subprocess before the training run so that the two overlap (mostly import time)."""
    from diffusers import WanVACETransformer3DModel
    from peft import LoraConfig, get_peft_model

    from identity_grpo.testing import randomize_lora_b

    root = tmp_path_factory.mktemp("report_inference")
    transformer = WanVACETransformer3DModel.from_pretrained(tiny_vace_dir, subfolder="transformer")
    lora = get_peft_model(transformer, LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_b(lora, std=1.0, seed=0)
    lora.save_pretrained(root / "lora")
    command = [
        sys.executable, str(ROOT / "test_wan2_1_vace.py"), "--config", f"{ROOT / 'config' / 'dgx.py'}:tiny",
        f"--config.pretrained.model={tiny_vace_dir}", f"--config.dataset={dataset_dir}",
        f"--config.logdir={root / 'runs'}", "--config.reward_fn={'ref_tone': 1.0}",
        f"--config.train.lora_path={root / 'lora'}", "--config.eval_baseline=True", "--config.sample.eval_sde=False",
        "--config.sample.eval_num_steps=2",
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def train_run(inference_launch, tmp_path_factory, tiny_vace_dir, dataset_dir):
    """A real run of ``train(config)``: 2 epochs, eval every epoch, rollout videos every epoch,
    tensorboard and wandb (offline) trackers. Returns (run folder, log messages)."""
    import train_wan2_1_vace
    from config.dgx import get_config

    config = get_config("tiny")
    config.pretrained.model = str(tiny_vace_dir)
    config.dataset = str(dataset_dir)
    config.logdir = str(tmp_path_factory.mktemp("report_logs"))
    config.reward_fn = {"ref_tone": 1.0}
    config.num_epochs, config.eval_freq, config.log_videos_freq = 2, 1, 1
    config.sample.train_batch_size, config.sample.num_image_per_prompt, config.sample.test_batch_size = 4, 2, 4
    config.tracker = "tensorboard,wandb"
    assert config.report is True  # the default: the run writes its report at the end
    handler, logger = Collect(), logging.getLogger("train_wan2_1_vace")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WANDB_MODE", "offline")
            patch.setenv("WANDB_SILENT", "true")
            summary = train_wan2_1_vace.train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return Path(summary["run_dir"]), handler.messages


@pytest.fixture(scope="module")
def inference_run(inference_launch):
    """The inference run's output folder (its last stdout line) and its log."""
    stdout, stderr = inference_launch.communicate(timeout=600)
    assert inference_launch.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return Path(stdout.strip().splitlines()[-1]), stderr


def copy_run(run_dir: Path, target: Path) -> Path:
    """A copy without the report the run wrote (tests edit copies, never the shared run)."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("report.html", "report_files", "wandb"))
    return target


class Links(HTMLParser):
    """Every src / href of a page, and the count of img and video elements."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.videos = [], 0, 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"
        self.videos += tag == "video"
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def links_of(page: Path) -> Links:
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def metrics_by_epoch(run_dir: Path) -> dict[int, dict]:
    return {record["epoch"]: record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------------------------------- data


def test_reward_curves_are_the_logged_means_with_their_std(train_run):
    run_dir, _ = train_run
    run = report.read_run(run_dir)
    logged = metrics_by_epoch(run_dir)
    assert run.kind == "training"
    assert list(run.rewards) == ["total", "ref_tone"]  # total first; bookkeeping keys are not rewards
    for name, curve in run.rewards.items():
        assert curve.x == [0, 1]
        assert curve.y == [logged[epoch][f"reward/{name}"] for epoch in (0, 1)]
        # The train script logs the rollouts' spread, so the band is drawn, not just the mean.
        assert curve.spread == [logged[epoch][f"reward/{name}/std"] for epoch in (0, 1)]
        assert all(value > 0 for value in curve.spread)
    assert run.seconds["ref_tone"].y == [logged[epoch]["reward/ref_tone/seconds"] for epoch in (0, 1)]
    assert not any("spread" in note for note in run.notes)


def test_rollout_std_is_the_population_std_of_the_epoch_rewards(train_run):
    """The logged std against the rollout rewards written next to the videos: the epoch's 4
    rollouts are exactly the logged videos here (train_batch_size 4, log_videos_count 4)."""
    run_dir, _ = train_run
    for epoch, logged in metrics_by_epoch(run_dir).items():
        records = [json.loads(path.read_text()) for path in (run_dir / "videos" / f"epoch_{epoch:05d}").glob("*.json")]
        rewards = torch.tensor([record["ref_tone"] for record in records], dtype=torch.float64)
        assert len(records) == 4
        assert logged["reward/ref_tone"] == pytest.approx(float(rewards.mean()), abs=1e-6)
        assert logged["reward/ref_tone/std"] == pytest.approx(float(rewards.std(correction=0)), abs=1e-6)


def test_eval_points_span_before_to_after_training(train_run):
    run_dir, _ = train_run
    run = report.read_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = run.evals["ref_tone"]
    # eval_freq 1 over 2 epochs: before epochs 0 and 1, and the final one after epoch 2.
    assert curve.x == [0, 1, 2]
    assert curve.y[0] == pytest.approx(summary["eval_before"]["ref_tone"], abs=1e-6)
    assert curve.y[-1] == pytest.approx(summary["eval_after"]["ref_tone"], abs=1e-6)


def test_training_statistics_come_from_tensorboard(train_run):
    run = report.read_run(train_run[0])
    assert {"train/kl", "train/clipfrac", "train/ratio", "train/grad_norm", "train/policy_loss"} <= set(run.train)
    assert list(run.train)[:2] == ["train/kl", "train/approx_kl"]
    for tag, curve in run.train.items():
        # One optimizer step per epoch in this config: x = epochs of training done after it.
        assert curve.x == [1.0, 2.0], tag
    assert all(value > 0 for value in run.train["train/grad_norm"].y)


def test_eval_gallery_pairs_every_test_row_before_and_after(train_run, dataset_dir):
    run_dir, _ = train_run
    run = report.read_run(run_dir)
    test_set = ReferenceVideoDataset(dataset_dir, "test")
    gallery = next(g for g in run.galleries if g.title.startswith("Evaluation"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row.prompt for row in gallery.rows] == [item.prompt for item in test_set.items]
    for row, item in zip(gallery.rows, test_set.items):
        assert len(row.references) == len(item.reference_paths)
        assert [clip.label for clip in row.clips] == ["epoch 0 (before training)", "epoch 2 (after training)"]
        assert all(clip.video is not None and clip.video.is_file() for clip in row.clips)
    after = [row.clips[1].scores["ref_tone"] for row in gallery.rows]
    assert sum(after) / len(after) == pytest.approx(summary["eval_after"]["ref_tone"], abs=1e-6)
    before = [row.clips[0].scores["ref_tone"] for row in gallery.rows]
    assert sum(before) / len(before) == pytest.approx(summary["eval_before"]["ref_tone"], abs=1e-6)


def test_inference_gallery_puts_base_and_lora_side_by_side(inference_run):
    out_dir, log = inference_run
    run = report.read_run(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert run.kind == "inference"
    (gallery,) = run.galleries
    assert len(gallery.rows) == summary["count"]
    for variant, column in (("base", 0), ("lora", 1)):
        scores = [row.clips[column].scores["ref_tone"] for row in gallery.rows]
        means = summary["base_means" if variant == "base" else "means"]
        assert sum(scores) / len(scores) == pytest.approx(means["ref_tone"], abs=1e-9)
        assert all(row.clips[column].video.parent == out_dir / variant / "videos" for row in gallery.rows)
    assert [clip.label for clip in gallery.rows[0].clips] == ["base model", "LoRA"]
    # The script wrote the report itself and logged where.
    assert (out_dir / "report.html").is_file()
    assert f"report: {out_dir / 'report.html'}" in log


def test_training_run_writes_its_report_and_logs_the_path(train_run):
    run_dir, messages = train_run
    assert (run_dir / "report.html").is_file()
    # Its last log lines (accelerate prefixes the rank): the report, then the before/after picture.
    assert messages[-2].endswith(f"report: {run_dir / 'report.html'}"), messages[-3:]
    assert messages[-1].endswith(f"per test row: {run_dir / 'before_after.png'}"), messages[-3:]


def test_before_after_picture_lays_out_references_first_and_last_evaluation(train_run, dataset_dir):
    import numpy as np
    from PIL import Image

    from vace_reward.data import read_video

    run_dir, _ = train_run
    grid = np.asarray(Image.open(run_dir / "before_after.png"))
    items = ReferenceVideoDataset(dataset_dir, "test").items
    size, frames, scale = 32, 5, 3  # tiny preset videos; enlarged to at least 96 pixels
    gap, row_height = size // 8, size + size // 8
    assert grid.shape[0] == len(items) * row_height * scale
    for row, item in enumerate(items):
        stem = f"{row:05d}"
        top = row * row_height * scale
        block = grid[top:top + size * scale:scale, ::scale]  # back to one pixel per video pixel
        refs = [np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
                for path in sorted((run_dir / "eval" / "epoch_00000").glob(f"{stem}_ref*.png"))]
        assert len(refs) == len(item.reference_paths)
        x = 0
        for ref in refs:
            np.testing.assert_array_equal(block[:, x:x + size], ref)
            x += size
        for epoch in (0, 2):  # first and last evaluation, all 5 frames (fewer than 8)
            x += gap
            video = read_video(run_dir / "eval" / f"epoch_{epoch:05d}" / f"{stem}.mp4")[0].numpy()
            for frame in video:
                np.testing.assert_array_equal(block[:, x:x + size], frame)
                x += size
        assert len(video) == frames
        assert (block[:, x:] == 255).all()  # padding of shorter rows only
    # A long test split is cut to its first rows: the picture of one row is the grid's first row.
    assert len(items) > 1
    first = np.asarray(Image.open(report.before_after_png(run_dir, run_dir.parent / "first_row.png", max_rows=1)))
    assert first.shape[0] == row_height * scale
    np.testing.assert_array_equal(first, grid[:row_height * scale, :first.shape[1]])
    assert (grid[:row_height * scale, first.shape[1]:] == 255).all()


# ---------------------------------------------------------------------------------------- plots


def test_several_runs_are_overlaid_one_colour_each(train_run, tmp_path):
    first = report.read_run(train_run[0], "first")
    second = report.read_run(copy_run(train_run[0], tmp_path / "second"), "second")
    specs = {spec.title: spec for spec in report.plot_specs([first, second])}
    reward = specs["reward: ref_tone"]
    assert [(line.label, line.style, line.colour) for line in reward.lines] == [
        ("first: train rollouts (mean \u00b1 std)", "train", 0), ("first: eval (test set)", "eval", 0),
        ("second: train rollouts (mean \u00b1 std)", "train", 1), ("second: eval (test set)", "eval", 1)]
    assert [line.label for line in specs["train/kl"].lines] == ["first", "second"]
    assert len({line.colour for line in specs["reward scoring time per epoch"].lines}) == 2


# ---------------------------------------------------------------------------------------- page


def test_every_link_is_relative_and_resolves_also_after_moving_the_report(train_run, inference_run, tmp_path):
    out = tmp_path / "comparison"
    page = report.write_report([train_run[0], inference_run[0]], out)
    parsed = links_of(page)
    assert parsed.videos == 3 * 2 + 3 * 2 + 4 * 2  # eval before/after, base/LoRA, rollouts of 2 epochs
    for link in parsed.links:
        assert not re.match(r"^([a-z]+:|/)", link), link
        assert (out / link).is_file(), link
    # Files of other folders were copied beside the page: it works moved elsewhere on its own.
    moved = shutil.move(out, tmp_path / "elsewhere")
    assert all((Path(moved) / link).is_file() for link in parsed.links)


def test_report_in_the_run_folder_links_the_run_files_in_place(train_run):
    run_dir, _ = train_run
    parsed = links_of(run_dir / "report.html")
    assert "eval/epoch_00000/00000.mp4" in parsed.links
    assert not (run_dir / report.FILES / "media").exists()  # nothing copied


def test_user_strings_are_escaped(train_run, tmp_path):
    run_dir = copy_run(train_run[0], tmp_path / "run_<img src=x onerror=alert(1)>")
    record_path = run_dir / "eval" / "epoch_00000" / "00000.json"
    record = json.loads(record_path.read_text())
    record["prompt"] = '<script>alert("x")</script> & "quotes"'
    record_path.write_text(json.dumps(record))
    text = report.write_report([run_dir]).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert '<script>alert("x")' not in text
    assert "run_&lt;img src=x onerror=alert(1)&gt;" in text and "<img src=x" not in text
    assert text.count("<script>") == 1  # only the page's own media check


def test_partial_run_gives_a_report_with_notes(train_run, tmp_path):
    run_dir = copy_run(train_run[0], tmp_path / "crashed")
    for name in ("summary.json", "eval", "videos"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink()
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "rew')  # killed mid-write
    run = report.read_run(run_dir)
    notes = " ".join(run.notes)
    for expected in ("summary.json is missing", "no tensorboard events", "no evaluation videos",
                     "metrics.jsonl line 3 is not valid JSON"):
        assert expected in notes
    assert run.rewards["ref_tone"].x == [0, 1] and not run.train and not run.galleries
    text = report.write_report([run_dir]).read_text(encoding="utf-8")
    assert "summary.json is missing" in text and "<video" not in text


def test_old_run_without_std_plots_the_mean_and_says_so(train_run, tmp_path):
    run_dir = copy_run(train_run[0], tmp_path / "old")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [json.dumps({k: v for k, v in record.items() if not k.endswith("/std")}) for record in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = report.read_run(run_dir)
    assert run.rewards["ref_tone"].spread is None
    assert any("no per-sample spread" in note for note in run.notes)
    (spec,) = [spec for spec in report.plot_specs([run]) if spec.title == "reward: ref_tone"]
    assert spec.lines[0].label == "train rollouts (mean)"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "identity_grpo.report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_missing_folder_is_one_line_naming_it(tmp_path):
    done = run_cli(str(tmp_path / "no_such_run"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'no_such_run'} does not exist; pass a run folder written " \
                                  "by train_wan2_1_vace.py or test_wan2_1_vace.py"


def test_parent_of_runs_is_refused_naming_the_runs_inside(train_run):
    logdir = train_run[0].parent
    done = run_cli(str(logdir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"{logdir} is not a run folder" in line and "pass one of them" in line and train_run[0].name in line


def test_corrupt_summary_names_the_file(train_run, tmp_path):
    run_dir = copy_run(train_run[0], tmp_path / "corrupt")
    (run_dir / "summary.json").write_text('{"eval_after": ')
    done = run_cli(str(run_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {run_dir / 'summary.json'} is not valid JSON")


def test_several_runs_need_an_output_folder(train_run):
    done = run_cli(str(train_run[0]), str(train_run[0]))
    assert done.returncode == 2 and "--out" in done.stderr


# ---------------------------------------------------------------------------------------- trackers


def test_frame_grid_puts_videos_in_rows_and_evenly_spaced_frames_in_columns():
    from identity_grpo.loop import frame_grid

    # Pixel value = 10 * video + frame, so every tile says where it came from.
    frames = (10 * torch.arange(2).view(2, 1, 1, 1, 1) + torch.arange(5).view(1, 5, 1, 1, 1)).expand(2, 5, 2, 3, 3)
    grid = frame_grid(frames.to(torch.uint8), max_frames=3)
    assert grid.shape == (2 * 2, 3 * 3, 3)
    for video in range(2):
        for column, frame in enumerate((0, 2, 4)):  # first, middle, last
            tile = grid[2 * video:2 * video + 2, 3 * column:3 * column + 3]
            assert torch.all(tile == 10 * video + frame)


def test_rollout_videos_reach_tensorboard_and_wandb(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = train_run
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("rollouts")
    assert [image.step for image in images] == [0, 1]  # log_videos_freq 1: both epochs
    # 4 videos of 32 x 32 as rows, the tiny preset's 5 frames as columns.
    assert [(image.height, image.width) for image in images] == [(4 * 32, 5 * 32)] * 2
    videos = list(run_dir.glob("wandb/offline-run-*/files/media/videos/rollouts_*.mp4"))
    assert len(videos) == 2 * 4
    assert {video.read_bytes() for video in videos} <= {
        path.read_bytes() for path in run_dir.glob("videos/epoch_*/*.mp4")}


# ---------------------------------------------------------------------------------------- browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("Chromium is not installed: `bash scripts/install.sh dev` installs the `chromium` package with "
                "apt-get only where apt-get exists and it runs as root or with sudo; install it by hand elsewhere")


def browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``file://<page>``; virtual time lets the videos load before it returns."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def media_status(page: Path, profile: Path) -> dict[str, str]:
    """The data-* attributes the page's own script sets on #media-status once every image and
    video has loaded or failed."""
    dom = browse(page, profile, "--dump-dom").stdout
    match = re.search(r'<div id="media-status"[^>]*>', dom)
    assert match, dom[-2000:]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', match.group(0)))


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_chromium_loads_every_image_and_video_and_takes_a_screenshot(train_run, tmp_path):
    run_dir, _ = train_run
    page = run_dir / "report.html"
    parsed = links_of(page)
    status = media_status(page, tmp_path / "profile")
    assert status == {"images": str(parsed.images), "videos": str(parsed.videos), "broken": "0", "done": "1"}
    assert parsed.images >= 8 and parsed.videos >= 6
    screenshot = run_dir / "report_screenshot.png"
    browse(page, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,1800")
    assert png_size(screenshot) == (1280, 1800)


def test_chromium_check_catches_a_broken_video(train_run, tmp_path):
    """The check above can fail: a video deleted after the report was written is reported."""
    run_dir = copy_run(train_run[0], tmp_path / "broken")
    page = report.write_report([run_dir])
    (run_dir / "eval" / "epoch_00000" / "00001.mp4").unlink()
    status = media_status(page, tmp_path / "profile")
    assert status["broken"] == "1" and status["done"] == "1"
