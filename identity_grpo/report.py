"""A run as one page a browser opens: reward curves, training statistics, the video gallery with
references and scores, the resolved config and the summary.

    python -m identity_grpo.report RUN_DIR [RUN_DIR ...] [--out DIR]

``RUN_DIR`` is a folder written by ``train_wan2_1_vace.py`` (``<logdir>/<run>_<timestamp>``) or by
``test_wan2_1_vace.py`` (``test_<run>_<timestamp>``). The page is ``<out>/report.html``; its plots
lie in ``<out>/report_files/``. Videos and images inside ``<out>`` are linked where they are;
those of other folders are copied into ``report_files/`` first, so every link is relative and the
page needs no network. With one run ``--out`` defaults to the run folder. docs/report.md.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import logging
import math
import os
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Keys of metrics.jsonl under reward/ that are group bookkeeping, not reward names.
BOOKKEEPING = {"zero_advantage_fraction", "zero_std_groups", "num_groups", "mean_group_size"}
# Training statistics plotted first, in this order; any other train/* tag follows.
TRAIN_ORDER = ["train/kl", "train/approx_kl", "train/clipfrac", "train/ratio", "train/grad_norm", "train/policy_loss"]
FILES = "report_files"
MEDIA = (".mp4", ".png", ".jpg", ".jpeg", ".webp")


class ReportError(Exception):
    """A run folder the report cannot read; the message is one line naming the file and what to do."""


@dataclass
class Curve:
    """One line of a plot: ``y`` at ``x`` (epochs of training done), and the per-sample standard
    deviation around ``y`` when the run logged it."""

    x: list[float]
    y: list[float]
    spread: list[float] | None = None


@dataclass
class Clip:
    """One video of a gallery row: its column label, file (None: missing) and scores."""

    label: str
    video: Path | None
    scores: dict[str, float]


@dataclass
class Row:
    """A gallery row: one prompt with its references and one clip per column (before / after, or
    base / LoRA)."""

    title: str
    prompt: str
    references: list[Path]
    clips: list[Clip]


@dataclass
class Gallery:
    title: str
    rows: list[Row]
    note: str = ""


@dataclass
class Run:
    """Everything the report shows of one folder."""

    path: Path
    label: str
    kind: str  # "training" or "inference"
    config: dict | None = None
    summary: dict | None = None
    rewards: dict[str, Curve] = field(default_factory=dict)  # reward name -> train mean per epoch
    evals: dict[str, Curve] = field(default_factory=dict)  # reward name -> eval mean per epoch
    train: dict[str, Curve] = field(default_factory=dict)  # train/<stat> -> per optimizer step
    seconds: dict[str, Curve] = field(default_factory=dict)  # reward name -> scoring seconds per epoch
    galleries: list[Gallery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error}); restore or delete it and rerun the report") from None


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """The records of ``path``; an unreadable line (a run killed mid-write) is skipped with a note."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {number} is not valid JSON (a run stopped mid-write?); it was skipped.")
    return records


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the event files directly in ``run_dir`` (tag -> (step, value), the last value per
    step: a resumed run logs the steps after its checkpoint again)."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    quiet = logging.getLogger("tensorboard")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # else it logs an INFO line per event file it reaches the end of
    try:
        accumulator.Reload()
    finally:
        quiet.setLevel(level)
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())
    return scalars


def by_epoch(records: list[dict]) -> list[dict]:
    """One record per epoch, the last written (a resumed run repeats the epochs after its checkpoint)."""
    last = {record["epoch"]: record for record in records if "epoch" in record}
    return [last[epoch] for epoch in sorted(last)]


def records_from_tensorboard(scalars: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """Per-epoch reward records rebuilt from tensorboard (runs without metrics.jsonl)."""
    epoch_of = dict(scalars.get("epoch", []))
    records: dict[int, dict] = {}
    for tag, points in scalars.items():
        if tag.startswith("reward/"):
            for step, value in points:
                if step in epoch_of:
                    records.setdefault(step, {"epoch": int(epoch_of[step]), "step": step})[tag] = value
    return by_epoch(list(records.values()))


def reward_names(records: list[dict]) -> list[str]:
    """Reward names in the records (``reward/<name>``), ``total`` first."""
    names = {key.split("/")[1] for record in records for key in record
             if key.startswith("reward/") and key.count("/") == 1 and key.split("/")[1] not in BOOKKEEPING}
    return sorted(names, key=lambda name: (name != "total", name))


def reward_curves(records: list[dict], run: Run) -> None:
    """Train mean (with the per-sample std when logged) and scoring seconds per reward, per epoch."""
    names = reward_names(records)
    for name in names:
        rows = [r for r in records if r.get(f"reward/{name}") is not None]
        spread = [r.get(f"reward/{name}/std") for r in rows]
        run.rewards[name] = Curve([r["epoch"] for r in rows], [r[f"reward/{name}"] for r in rows],
                                  spread if all(s is not None for s in spread) and spread else None)
        timed = [r for r in rows if r.get(f"reward/{name}/seconds") is not None]
        if timed:
            run.seconds[name] = Curve([r["epoch"] for r in timed], [r[f"reward/{name}/seconds"] for r in timed])
    if names and not all(curve.spread for curve in run.rewards.values()):
        run.notes.append("metrics.jsonl has no per-sample spread (reward/<name>/std) for every reward: those curves "
                         "show the mean only.")


def train_curves(scalars: dict[str, list[tuple[int, float]]], run: Run) -> None:
    """``train/*`` statistics at x = epoch + (k + 1) / n for the k-th of an epoch's n optimizer steps,
    so that x counts the epochs of training done, as for the reward curves."""
    epoch_of = {step: int(value) for step, value in scalars.get("epoch", [])}
    tags = [tag for tag in TRAIN_ORDER if tag in scalars]
    tags += sorted(tag for tag in scalars if tag.startswith("train/") and tag not in TRAIN_ORDER)
    for tag in tags:
        points = [(epoch_of[step], value) for step, value in scalars[tag] if step in epoch_of]
        counts: dict[int, int] = {}
        for epoch, _ in points:
            counts[epoch] = counts.get(epoch, 0) + 1
        seen: dict[int, int] = {}
        x = []
        for epoch, _ in points:
            seen[epoch] = seen.get(epoch, 0) + 1
            x.append(epoch + seen[epoch] / counts[epoch])
        run.train[tag] = Curve(x, [value for _, value in points])


def eval_curves(run: Run, scalars: dict[str, list[tuple[int, float]]], records: list[dict]) -> None:
    """Eval means per epoch: from tensorboard (every evaluation), else the saved eval rows (first and
    final evaluation), else summary.json's before/after."""
    num_epochs = (run.config or {}).get("num_epochs")
    step_epoch = {record["step"]: record["epoch"] for record in records if "step" in record}
    last_step = max(step_epoch, default=-1)
    for tag, points in scalars.items():
        if tag.startswith("eval/"):
            # The final evaluation is logged after the last optimizer step: past every epoch's start.
            xs = [(step_epoch.get(step, num_epochs if step > last_step else None), value) for step, value in points]
            xs = [(x, value) for x, value in xs if x is not None]
            if xs:
                run.evals[tag[5:]] = Curve([x for x, _ in xs], [value for _, value in xs])
    if run.evals:
        return
    folders = eval_folders(run.path)
    if folders:
        for epoch, folder in folders:
            rows = [read_json(path) for path in sorted(folder.glob("*.json"))]
            for key in {key for row in rows for key in row if key not in ("index", "prompt")}:
                values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
                if values:
                    curve = run.evals.setdefault(key, Curve([], []))
                    curve.x.append(epoch)
                    curve.y.append(sum(values) / len(values))
        return
    summary = run.summary or {}
    for x, means in ((0, summary.get("eval_before")), (num_epochs, summary.get("eval_after"))):
        for key, value in (means or {}).items():
            if x is not None and value is not None:
                curve = run.evals.setdefault(key, Curve([], []))
                curve.x.append(x)
                curve.y.append(value)


def eval_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, folder)`` of ``<run>/eval/epoch_<n>/``, by epoch."""
    found = []
    for folder in (run_dir / "eval").glob("epoch_*"):
        suffix = folder.name[len("epoch_"):]
        if folder.is_dir() and suffix.isdigit():
            found.append((int(suffix), folder))
    return sorted(found)


def numeric_scores(record: dict, skip=("index", "prompt")) -> dict[str, float]:
    scores = {}
    for key, value in record.items():
        if key in skip:
            continue
        try:
            scores[key] = float(value)
        except (TypeError, ValueError):
            continue
    return scores


def existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def eval_gallery(run: Run) -> Gallery | None:
    """Every test row once, a column per saved evaluation (before and after training)."""
    folders = eval_folders(run.path)
    if not folders:
        return None
    num_epochs = (run.config or {}).get("num_epochs")
    labels = {}
    for epoch, _ in folders:
        labels[epoch] = f"epoch {epoch}"
        if epoch == 0:
            labels[epoch] += " (before training)"
        elif epoch == num_epochs:
            labels[epoch] += " (after training)"
    stems = sorted({path.stem for _, folder in folders for path in folder.glob("*.json")})
    rows = []
    for stem in stems:
        records = {epoch: read_json(folder / f"{stem}.json") for epoch, folder in folders}
        first = next(record for record in records.values() if record is not None)
        references = sorted(next(folder for epoch, folder in folders if records[epoch]).glob(f"{stem}_ref*.png"))
        clips = [Clip(labels[epoch], existing(folder / f"{stem}.mp4"), numeric_scores(records[epoch] or {}))
                 for epoch, folder in folders]
        title = f"test row {int(stem)}" if stem.isdigit() else stem
        rows.append(Row(title, first.get("prompt", ""), references, clips))
    return Gallery("Evaluation: the test rows before and after training", rows,
                   "The same initial noise per row at every evaluation (the deterministic sampler, or the training SDE "
                   "with fixed noise when sample.eval_sde is set), so the columns differ only by the weights.")


def rollout_gallery(run: Run) -> Gallery | None:
    """The training rollouts logged every ``log_videos_freq`` epochs (different prompts each epoch)."""
    rows = []
    folders = sorted((run.path / "videos").glob("epoch_*"))
    for folder in folders:
        epoch = folder.name[len("epoch_"):]
        for record_path in sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
            record = read_json(record_path)
            stem = record_path.stem
            title = f"epoch {int(epoch) if epoch.isdigit() else epoch}, sample {stem}"
            rows.append(Row(title, record.get("prompt", ""), sorted(folder.glob(f"{stem}_ref*.png")),
                            [Clip("rollout", existing(folder / f"{stem}.mp4"), numeric_scores(record))]))
    if not rows:
        return None
    return Gallery("Training rollouts", rows, "The first rollouts of every logged epoch (SDE sampling, the "
                   "prompts drawn that epoch): a view of what the policy was trained on, not a before/after pair.")


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def inference_gallery(run: Run) -> Gallery | None:
    """test_wan2_1_vace.py's output: one row per test row, base and LoRA side by side when both ran."""
    variants = [(name, run.path / name / "scores.csv") for name in ("base", "lora")]
    variants = [(name, path) for name, path in variants if path.is_file()]
    if not variants and (run.path / "scores.csv").is_file():
        variants = [("LoRA" if (run.summary or {}).get("lora_path") else "base model", run.path / "scores.csv")]
    if not variants:
        return None
    tables = {name: {row["index"]: row for row in read_csv_rows(path)} for name, path in variants}
    labels = {"base": "base model", "lora": "LoRA"}
    rows = []
    for index in sorted({i for table in tables.values() for i in table}, key=lambda i: int(i) if i.isdigit() else 0):
        first = next(table[index] for table in tables.values() if index in table)
        references = [run.path / copy for copy in first.get("reference_copies", "").split(";") if copy]
        clips = []
        for name, table in tables.items():
            row = table.get(index, {})
            video = existing(run.path / row["video"]) if row.get("video") else None
            clips.append(Clip(labels.get(name, name), video, numeric_scores(
                row, skip=("index", "prompt", "ref_paths", "reference_copies", "video"))))
        rows.append(Row(f"test row {index}", first.get("prompt", ""), [p for p in references if p.is_file()], clips))
    return Gallery("Test set: base model and LoRA" if len(variants) > 1 else "Test set", rows)


def folder_kind(path: Path) -> str:
    """``training`` or ``inference``; a folder that is neither raises, naming what was looked for."""
    if not path.exists():
        raise ReportError(f"{path} does not exist; pass a run folder written by train_wan2_1_vace.py or "
                          "test_wan2_1_vace.py")
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder; pass a run folder (the one holding config.json)")
    if (path / "scores.csv").is_file() or any((path / name / "scores.csv").is_file() for name in ("base", "lora")):
        return "inference"
    if any((path / name).exists() for name in ("metrics.jsonl", "summary.json", "config.json")):
        return "training"
    runs = sorted(child.name for child in path.iterdir() if (child / "config.json").is_file())
    hint = f"; it holds run folders ({', '.join(runs[:5])}): pass one of them" if runs else ""
    raise ReportError(f"{path} is not a run folder: it has none of config.json, metrics.jsonl, summary.json or "
                      f"scores.csv{hint}")


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read one run folder; what is missing becomes a note on the page, not an error."""
    path = Path(path)
    run = Run(path=path, label=label or path.name, kind=folder_kind(path))
    run.config = read_json(path / "config.json")
    run.summary = read_json(path / "summary.json")
    if run.config is None:
        run.notes.append("config.json is missing: the resolved config is not shown.")
    if run.kind == "inference":
        if (path / "INCOMPLETE.txt").is_file():
            run.notes.append((path / "INCOMPLETE.txt").read_text(encoding="utf-8").strip())
        if run.summary is None:
            run.notes.append("summary.json is missing: the run stopped before writing it.")
        gallery = inference_gallery(run)
        if gallery is None:
            run.notes.append("no scores.csv with videos: nothing to show in the gallery.")
        run.galleries = [gallery] if gallery else []
        return run
    read_training(run)
    return run


def read_training(run: Run) -> None:
    scalars = read_tensorboard(run.path)
    metrics = run.path / "metrics.jsonl"
    records = by_epoch(read_jsonl(metrics, run.notes)) if metrics.is_file() else records_from_tensorboard(scalars)
    if not metrics.is_file():
        run.notes.append("metrics.jsonl is missing: reward curves come from tensorboard"
                         if records else "metrics.jsonl is missing: no reward curves.")
    reward_curves(records, run)
    train_curves(scalars, run)
    if not scalars:
        run.notes.append("no tensorboard events in the run folder (config.tracker has no tensorboard): the KL, "
                         "clipfrac, ratio and grad-norm curves are not available.")
    eval_curves(run, scalars, records)
    if run.summary is None:
        run.notes.append("summary.json is missing: the run did not finish (or is still running).")
    run.galleries = [g for g in (eval_gallery(run), rollout_gallery(run)) if g is not None]
    if not any(g.title.startswith("Evaluation") for g in run.galleries):
        run.notes.append("no evaluation videos (<run>/eval/epoch_*/): runs write them at the first and the final "
                         "evaluation; no before/after gallery.")


# ---------------------------------------------------------------------------------------- plots


@dataclass
class Line:
    label: str
    curve: Curve
    style: str  # "train": a line with the std band when known; "eval": markers on a dashed line
    colour: int  # one per run


@dataclass
class PlotSpec:
    file: str  # relative to the report folder
    title: str
    ylabel: str
    lines: list[Line]


def plot_specs(runs: list[Run]) -> list[PlotSpec]:
    """Reward curves (train mean +- std, eval points) per reward name, then every training
    statistic, then scoring seconds; all runs overlaid, one colour per run."""
    specs = []
    # The run's name in the legend only when there are several.
    prefix = [f"{run.label}: " if len(runs) > 1 else "" for run in runs]
    names = sorted({name for run in runs for name in [*run.rewards, *run.evals]}, key=lambda n: (n != "total", n))
    for number, name in enumerate(names):
        lines = []
        for colour, run in enumerate(runs):
            if name in run.rewards:
                band = " (mean \u00b1 std)" if run.rewards[name].spread else " (mean)"
                lines.append(Line(f"{prefix[colour]}train rollouts{band}", run.rewards[name], "train", colour))
            if name in run.evals:
                lines.append(Line(f"{prefix[colour]}eval (test set)", run.evals[name], "eval", colour))
        specs.append(PlotSpec(f"{FILES}/reward_{number}.png", f"reward: {name}", name, lines))
    tags = list(dict.fromkeys(tag for run in runs for tag in run.train))
    for number, tag in enumerate(tags):
        lines = [Line(run.label if len(runs) > 1 else "per optimizer step", run.train[tag], "train", colour)
                 for colour, run in enumerate(runs) if tag in run.train]
        specs.append(PlotSpec(f"{FILES}/train_{number}.png", tag, tag.split("/", 1)[1], lines))
    # Several rewards per run here: colours count on past the runs' own.
    seconds = [Line(f"{prefix[number]}{name}", curve, "train", number + position * len(runs))
               for number, run in enumerate(runs) for position, (name, curve) in enumerate(run.seconds.items())]
    if seconds:
        specs.append(PlotSpec(f"{FILES}/reward_seconds.png", "reward scoring time per epoch", "seconds", seconds))
    return specs


def draw(spec: PlotSpec, out_dir: Path) -> None:
    """``spec`` as a PNG at ``out_dir / spec.file``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas, not pyplot: no global backend state in a training process.
    figure = Figure(figsize=(4.6, 3.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for line in spec.lines:
        colour, curve = f"C{line.colour % 10}", line.curve
        if line.style == "eval":
            axes.plot(curve.x, curve.y, "o--", color=colour, label=line.label, markersize=5)
            continue
        axes.plot(curve.x, curve.y, "-", color=colour, label=line.label, marker="." if len(curve.x) < 30 else None)
        if curve.spread:
            low = [y - s for y, s in zip(curve.y, curve.spread)]
            high = [y + s for y, s in zip(curve.y, curve.spread)]
            axes.fill_between(curve.x, low, high, color=colour, alpha=0.18, linewidth=0)
    axes.set_title(spec.title, fontsize=10)
    axes.set_xlabel("epochs of training done", fontsize=8)
    axes.set_ylabel(spec.ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    if spec.lines:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / spec.file)


# ---------------------------------------------------------------------------------------- html

PAGE = string.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd} h3{font-size:15px}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px;margin:4px 0;font-size:13px}
.broken{background:#fde8e8;border-left:4px solid #c00;padding:6px 10px}
.plots{display:flex;flex-wrap:wrap;gap:8px} .plots img{width:440px;border:1px solid #eee}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;max-width:680px}
.card .prompt{font-style:italic;margin:4px 0 6px}
.refs img{height:96px;margin-right:4px;border:1px solid #ccc;image-rendering:pixelated}
.clips{display:flex;gap:10px;margin-top:6px} figure{margin:0}
video{width:200px;background:#000;image-rendering:pixelated} figcaption{font-weight:600;margin-bottom:2px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left} .missing{color:#c00}
pre{background:#f6f6f6;padding:8px;font-size:11px;max-height:480px;overflow:auto}
</style></head>
<body>
<h1>$title</h1>
<div id="media-status" class="broken" hidden></div>
$body
<script>
// Marks every image and video that fails to load, on the page and in #media-status's data-*
// attributes (which the browser test reads): a report must not ship broken links.
(function () {
  const status = document.getElementById("media-status");
  const images = Array.from(document.images).filter((img) => img.closest("body"));
  const videos = Array.from(document.querySelectorAll("video"));
  const imageResult = (img) => new Promise((done) => {
    if (img.complete) { done(img.naturalWidth > 0); return; }
    img.addEventListener("load", () => done(img.naturalWidth > 0));
    img.addEventListener("error", () => done(false));
  });
  const videoResult = (video) => new Promise((done) => {
    if (video.error) { done(false); return; }
    if (video.readyState >= 2) { done(video.videoWidth > 0); return; }
    video.addEventListener("loadeddata", () => done(video.videoWidth > 0));
    video.addEventListener("error", () => done(false));
  });
  Promise.all([Promise.all(images.map(imageResult)), Promise.all(videos.map(videoResult))]).then(([imgs, vids]) => {
    const broken = [];
    imgs.forEach((ok, i) => { if (!ok) broken.push(images[i].getAttribute("src")); });
    vids.forEach((ok, i) => { if (!ok) broken.push(videos[i].getAttribute("src")); });
    status.dataset.images = imgs.length; status.dataset.videos = vids.length;
    status.dataset.broken = broken.length; status.dataset.done = "1";
    if (broken.length) { status.hidden = false; status.textContent = "Could not load: " + broken.join(", "); }
  });
})();
</script>
</body></html>
""")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


class Linker:
    """Relative links from the report folder: files inside it are linked where they lie; others
    are copied to ``report_files/media/<run>/`` so the folder can be moved or zipped alone."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir.resolve()

    def __call__(self, path: Path, run: Run) -> str:
        path = path.resolve()
        if not path.is_relative_to(self.out_dir):
            target = self.out_dir / FILES / "media" / run.label / path.relative_to(run.path.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            path = target
        return Path(os.path.relpath(path, self.out_dir)).as_posix()


def scores_table(scores: dict[str, float]) -> str:
    if not scores:
        return ""
    rows = "".join(f"<tr><td>{esc(key)}</td><td>{fmt(value)}</td></tr>" for key, value in scores.items())
    return f"<table>{rows}</table>"


def clip_html(clip: Clip, run: Run, link: Linker) -> str:
    if clip.video is None:
        player = '<div class="missing">video missing</div>'
    else:
        player = (f'<video src="{esc(link(clip.video, run))}" controls loop muted playsinline '
                  # auto: the first frame shows without a click (local files, so cheap).
                  'preload="auto"></video>')
    return f"<figure><figcaption>{esc(clip.label)}</figcaption>{player}{scores_table(clip.scores)}</figure>"


def gallery_html(gallery: Gallery, run: Run, link: Linker) -> str:
    cards = []
    for row in gallery.rows:
        references = "".join(f'<img src="{esc(link(path, run))}" alt="reference {number}">'
                             for number, path in enumerate(row.references))
        clips = "".join(clip_html(clip, run, link) for clip in row.clips)
        cards.append(f'<div class="card"><b>{esc(row.title)}</b><div class="prompt">{esc(row.prompt)}</div>'
                     f'<div class="refs">{references}</div><div class="clips">{clips}</div></div>')
    note = f'<p class="note">{esc(gallery.note)}</p>' if gallery.note else ""
    return f'<h3>{esc(gallery.title)}</h3>{note}<div class="cards">{"".join(cards)}</div>'


def summary_html(run: Run) -> str:
    """Before/after (training) or base/LoRA (inference) means as a table, then the raw files."""
    summary = run.summary or {}
    columns = [("eval before", summary.get("eval_before")), ("eval after", summary.get("eval_after"))]
    if run.kind == "inference":
        columns = [("base model", summary.get("base_means")), ("LoRA" if summary.get("lora_path") else "model",
                                                              summary.get("means")),
                   ("difference", summary.get("difference"))]
    columns = [(name, values) for name, values in columns if values]
    table = ""
    if columns:
        keys = list(dict.fromkeys(key for _, values in columns for key in values))
        head = "".join(f"<th>{esc(name)}</th>" for name, _ in columns)
        body = "".join(f"<tr><td>{esc(key)}</td>" + "".join(f"<td>{fmt(values.get(key))}</td>" for _, values in columns)
                       + "</tr>" for key in keys)
        table = f"<table><tr><th>reward</th>{head}</tr>{body}</table>"
    raw = ""
    for name, content in (("summary.json", run.summary), ("config.json (resolved)", run.config)):
        if content is not None:
            raw += f"<details><summary>{esc(name)}</summary><pre>{esc(json.dumps(content, indent=2))}</pre></details>"
    return table + raw


def run_html(run: Run, link: Linker) -> str:
    notes = "".join(f'<p class="note">{esc(note)}</p>' for note in run.notes)
    galleries = "".join(gallery_html(gallery, run, link) for gallery in run.galleries)
    return (f"<h2>{esc(run.label)} <small>({esc(run.kind)})</small></h2><p><code>{esc(run.path)}</code></p>{notes}"
            f"<h3>Summary</h3>{summary_html(run)}{galleries}")


def page_html(runs: list[Run], plots: list[PlotSpec], link: Linker) -> str:
    title = "Identity-GRPO report: " + ", ".join(run.label for run in runs)
    if plots:
        curves = "".join(f'<img src="{esc(p.file)}" alt="{esc(p.title)}">' for p in plots)
        curves = f'<h2>Curves</h2><div class="plots">{curves}</div>'
    else:
        curves = '<h2>Curves</h2><p class="note">No training metrics in these folders (inference output).</p>'
    body = curves + "".join(run_html(run, link) for run in runs)
    return PAGE.substitute(title=esc(title), body=body)


# ---------------------------------------------------------------------------------------- entry


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names, with the parent's name (then a number) added where two runs share one."""
    labels = [path.name for path in paths]
    for number, path in enumerate(paths):
        if labels.count(path.name) > 1:
            labels[number] = f"{path.parent.name}-{path.name}-{number}"
    return labels


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write ``<out_dir>/report.html`` for ``run_dirs`` (``out_dir`` defaults to the run folder when
    there is one run); returns its path. Raises :class:`ReportError` for an unusable folder."""
    paths = [Path(path) for path in run_dirs]
    if not paths:
        raise ReportError("no run folder given; pass at least one RUN_DIR")
    if out_dir is None:
        if len(paths) > 1:
            raise ReportError("several runs: pass --out DIR, the folder to write report.html to")
        out_dir = paths[0]
    runs = [read_run(path, label) for path, label in zip(paths, unique_labels(paths))]
    out_dir = Path(out_dir)
    files = out_dir / FILES
    # report_files/ is the report's own folder: rebuilt every time so no stale plot or copy remains.
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    plots = plot_specs(runs)
    for spec in plots:
        draw(spec, out_dir)
    page = page_html(runs, plots, Linker(out_dir))
    report = out_dir / "report.html"
    report.write_text(page, encoding="utf-8")
    return report


def before_after_png(run_dir: str | Path, out: str | Path | None = None, max_frames: int = 8,
                     min_height: int = 96, max_rows: int = 16) -> Path | None:
    """One picture of the evaluation gallery, for a quick look without a browser: per test row
    (the first ``max_rows``; the report shows them all), its references, then up to
    ``max_frames`` evenly spaced frames of the first evaluation (before training) and of the last
    (after), side by side; tiny videos are enlarged (nearest neighbour) to at least
    ``min_height`` pixels. Written to ``out`` (default ``<run>/before_after.png``); None when the
    run saved fewer than two evaluations."""
    import numpy as np
    from PIL import Image

    from vace_reward.data import read_video

    folders = eval_folders(Path(run_dir))
    if len(folders) < 2:
        return None
    (_, first), (_, last) = folders[0], folders[-1]
    rows = []
    for record in sorted(first.glob("*.json")):
        before, after = first / f"{record.stem}.mp4", last / f"{record.stem}.mp4"
        if not (before.is_file() and after.is_file()):
            continue
        videos = [read_video(before)[0].numpy(), read_video(after)[0].numpy()]
        height, width = videos[0][0].shape[:2]
        gap = np.full((height, max(1, width // 8), 3), 255, np.uint8)
        parts = [np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC))
                 for path in sorted(first.glob(f"{record.stem}_ref*.png"))]
        for frames in videos:
            picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
            parts += [gap] + [frames[i] for i in picks]
        rows.append(np.concatenate(parts, axis=1))
        if len(rows) == max_rows:
            break
    if not rows:
        return None
    widest = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, row.shape[0] // 8), (0, widest - row.shape[1]), (0, 0)), constant_values=255)
            for row in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, math.ceil(min_height / rows[0].shape[0]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    out = Path(out) if out is not None else Path(run_dir) / "before_after.png"
    grid.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m identity_grpo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run or test_wan2_1_vace.py folder")
    parser.add_argument("--out", default=None, help="folder for report.html (default: the run folder, one run only)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dirs, args.out)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
