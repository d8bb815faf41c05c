"""Batch inference of a (GRPO-trained) Wan model on the test split: videos, rewards, a summary.

    accelerate launch --num_processes 8 test_wan2_1_vace.py --config config/dgx.py:vace \
        --config.train.lora_path=outputs/identity_grpo/<run>/lora [--config.eval_baseline=True]

Every row of ``<config.dataset>/test.csv`` is generated with the evaluation settings of the
training loop (``loop.evaluate``: eval size, ``sample.eval_num_steps``, the ODE sampler unless
``sample.eval_sde``, fixed initial noise per row), so a row's video depends only on the row, the
seed and the weights, not on the number of GPUs. Rows are sharded over ranks; each rank writes
its own videos and reference copies, and the main process writes ``scores.csv`` and
``summary.json``. Output layout and options: docs/testing.md. Besides the rewards, every video gets
the FaceSim columns of ``config.facesim`` with the copy-paste diagnostic, and the ``OpenS2V/<metric>``
columns of ``config.opens2v`` (Motion; FaceSim-Arc, FaceSim-Cur and Aesthetics from local weights;
docs/rewards.md says which compare with OpenS2V-Eval's leaderboard).
"""

from __future__ import annotations

import contextlib
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from absl import app, flags
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from ml_collections import config_flags

from identity_grpo.configuration import validate_config
from identity_grpo.data import ReferenceVideoDataset
from identity_grpo.loop import evaluate, make_unique_dir, write_video
from identity_grpo.metrics.opens2v_eval import OpenS2VMetrics, validate_opens2v_config
from identity_grpo.models import DTYPES, add_lora, load_rollout_pipeline
from identity_grpo.report import write_report
from identity_grpo.rewards import build_reward_fn
from identity_grpo.rewards.copy_paste import copy_paste_columns, copy_paste_scorer
from identity_grpo.rewards.facesim import FaceSimScorer, backend_configured, facesim_columns
from identity_grpo.tracking import init_logging, write_json

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "config/dgx.py:vace", "Configuration (a preset of config/dgx.py).")
logger = get_logger(__name__)

# Columns of scores.csv before the score columns.
ROW_COLUMNS = ("index", "prompt", "ref_paths", "reference_copies", "video")


def copy_references(dataset: ReferenceVideoDataset, index: int, out_dir: Path) -> list[str]:
    """Copy row ``index``'s reference images to ``<out_dir>/references/``; their paths relative to ``out_dir``."""
    copies = []
    for position, source in enumerate(dataset[index].reference_paths):
        target = Path("references", f"{index:05d}_{position}{source.suffix}")
        shutil.copyfile(source, out_dir / target)
        copies.append(str(target))
    return copies


def facesim_scores(scorer: FaceSimScorer | None, dataset, rows: list[dict]) -> None:
    """Add the FaceSim columns (named by the backend: FaceSim-Arc, FaceSim-dlib, ...) and the
    copy-paste diagnostic's columns to every row in place (no-op without a scorer)."""
    if scorer is None:
        return
    copy_paste = copy_paste_scorer(scorer)
    for row in rows:
        frames, references = row["frames"][None], [dataset.load_references(row["index"])]
        row.update(facesim_columns(scorer.score(frames, references), scorer.metric_name)[0])
        row.update(copy_paste_columns(copy_paste.score(frames, references))[0])


def opens2v_scores(metrics: OpenS2VMetrics, dataset, rows: list[dict]) -> None:
    """Add the OpenS2V/<metric> columns the config turns on (Motion, FaceSim-Arc/Cur, Aesthetics)
    to every row in place."""
    if not metrics.enabled:
        return
    for row in rows:
        references = [np.asarray(image.convert("RGB")) for image in dataset.load_references(row["index"])]
        row.update(metrics.columns(row["frames"].cpu().numpy(), references))


def generate_variant(name, pipeline, dataset, reward_fn, scorer, opens2v, config, accelerator, out_dir: Path,
                     variant_dir: Path, references: dict[int, list[str]]) -> list[dict]:
    """Generate and score this rank's share of the test rows and write their videos to
    ``<variant_dir>/videos``; return every rank's rows (paths relative to ``out_dir``, no frames),
    sorted by index, on every rank."""
    logger.info("generating the test set with the %s model", name)
    _, rows = evaluate(pipeline, dataset, reward_fn, config, accelerator)
    facesim_scores(scorer, dataset, rows)
    opens2v_scores(opens2v, dataset, rows)
    (variant_dir / "videos").mkdir(parents=True, exist_ok=True)
    fps = int(config.get("video_fps", 16))
    for row in rows:
        video = variant_dir / "videos" / f"{row['index']:05d}.mp4"
        write_video(video, row.pop("frames"), fps)
        item = dataset[row["index"]]
        row["ref_paths"] = ";".join(_relative(path, dataset.root) for path in item.reference_paths)
        row["reference_copies"] = ";".join(references[row["index"]])
        row["video"] = str(video.relative_to(out_dir))
    return sorted(gather_object(rows), key=lambda row: row["index"])


def _relative(path: Path, root: Path) -> str:
    """``path`` as written in the CSV: relative to the dataset root when it lies under it."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def score_keys(rows: list[dict]) -> list[str]:
    """Score columns present in any row, in first-seen order (rows with fewer references lack some
    ``FaceSim-Arc/subject_<k>`` columns)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update({key: None for key in row if key not in ROW_COLUMNS})
    return list(keys)


def column_means(rows: list[dict], keys: list[str]) -> dict[str, float]:
    """Mean of every score column over the rows that have it."""
    means = {}
    for key in keys:
        values = [float(row[key]) for row in rows if key in row]
        means[key] = math.fsum(values) / len(values)
    return means


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            # repr keeps every float's exact value, so the summary's means can be recomputed from the CSV.
            writer.writerow({key: repr(value) if isinstance(value, float) else value for key, value in row.items()})


def run_inference(config, config_name: str = "") -> Path:
    """Generate and score the test set as configured; returns the output folder."""
    # ---------------------------------------------------------------- setup
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    init_logging(accelerator)
    validate_config(config, accelerator.num_processes, training=False, check_files=True)
    validate_opens2v_config(config)
    logger.info("resolved config:\n%s", config)
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    lora_path = config.train.lora_path
    eval_baseline = bool(config.get("eval_baseline", False))
    if eval_baseline and not lora_path:
        logger.warning("eval_baseline is set but train.lora_path is empty: generating with the base model only")
        eval_baseline = False

    # Everything that can fail on bad input (test.csv, the LoRA folder, the reward models) fails
    # before the output folder is created.
    test_set = ReferenceVideoDataset(config.dataset, "test")
    pipeline = load_rollout_pipeline(config, accelerator.device, DTYPES[config.mixed_precision])
    if lora_path:
        pipeline.transformer = add_lora(pipeline.transformer, config)
        logger.info("LoRA loaded from %s", lora_path)
    pipeline.transformer.eval()
    reward_fn = build_reward_fn(config, accelerator.device)
    scorer = FaceSimScorer.from_config(config, accelerator.device) if backend_configured(config) else None
    opens2v = OpenS2VMetrics.from_config(config, accelerator.device)

    parent = config.get("test_save_dir", "") or config.logdir
    out_dir = make_unique_dir(parent, f"test_{config.run_name or 'run'}", accelerator)
    (out_dir / "references").mkdir(exist_ok=True)
    if accelerator.is_main_process:
        (out_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    logger.info(
        "***** inference *****\n  processes = %d\n  test rows = %d\n  videos: %dx%d, %d frames, %d steps (%s)"
        "\n  LoRA = %s\n  baseline = %s\n  OpenS2V metrics = %s\n  output = %s",
        accelerator.num_processes, len(test_set), config.eval_height, config.eval_width, config.eval_frames,
        config.sample.eval_num_steps, "SDE" if config.sample.eval_sde else "ODE", lora_path or "none (base model)",
        eval_baseline, ", ".join(opens2v.names) or "none", out_dir,
    )

    try:
        write_results(config, config_name, accelerator, pipeline, test_set, reward_fn, scorer, opens2v, out_dir,
                      eval_baseline)
    except BaseException:
        if accelerator.is_main_process:
            clean_up_failed_run(out_dir)
        raise
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if config.get("report", True) and accelerator.is_main_process:
        logger.info("report: %s", write_report([out_dir]))  # the base vs LoRA gallery (docs/report.md)
    return out_dir


def clean_up_failed_run(out_dir: Path) -> None:
    """After a failure: remove the output folder if it holds no video yet (only the config and
    reference copies), else keep the videos and mark the folder incomplete, saying what is there."""
    videos = sorted(out_dir.rglob("*.mp4"))
    if not videos:
        shutil.rmtree(out_dir, ignore_errors=True)
        logger.error("the run failed before any video was written; removed its output folder %s", out_dir)
        return
    note = (f"This run failed before it finished: {len(videos)} video(s) were written, but scores.csv and "
            "summary.json are missing or incomplete. See the log for the error; rerun into a new folder.\n")
    with contextlib.suppress(OSError):  # the failure may be a full disk
        (out_dir / "INCOMPLETE.txt").write_text(note)
    logger.error("the run failed; %s keeps the %d video(s) written so far and is marked INCOMPLETE.txt",
                 out_dir, len(videos))


def write_results(config, config_name, accelerator, pipeline, test_set, reward_fn, scorer, opens2v, out_dir: Path,
                  eval_baseline: bool) -> None:
    """Generate every variant, write videos, ``scores.csv`` and ``summary.json`` to ``out_dir``."""
    lora_path = config.train.lora_path
    # ---------------------------------------------------------------- generate
    mine = range(accelerator.process_index, len(test_set), accelerator.num_processes)
    references = {index: copy_references(test_set, index, out_dir) for index in mine}
    variants = [("lora" if lora_path else "base", contextlib.nullcontext())]
    if eval_baseline:
        variants.insert(0, ("base", pipeline.transformer.disable_adapter()))
    results = {}
    for name, adapter in variants:
        variant_dir = out_dir / name if eval_baseline else out_dir
        with adapter:
            results[name] = generate_variant(name, pipeline, test_set, reward_fn, scorer, opens2v, config,
                                             accelerator, out_dir, variant_dir, references)

    # ---------------------------------------------------------------- write
    if accelerator.is_main_process:
        summary = {"config": config_name, "run_name": config.run_name, "lora_path": lora_path,
                   "count": len(test_set), "output_dir": str(out_dir)}
        for name, rows in results.items():
            keys = score_keys(rows)
            write_csv((out_dir / name if eval_baseline else out_dir) / "scores.csv", rows, [*ROW_COLUMNS, *keys])
            summary[f"{name}_means" if eval_baseline else "means"] = column_means(rows, keys)
        if eval_baseline:
            summary["means"] = summary.pop("lora_means")
            summary["difference"] = {key: summary["means"][key] - summary["base_means"][key]
                                     for key in summary["means"] if key in summary["base_means"]}
            write_side_by_side(out_dir / "scores.csv", results["base"], results["lora"])
        write_json(out_dir / "summary.json", summary)
        for key, value in summary["means"].items():
            base = f" (base {summary['base_means'][key]:.4f})" if eval_baseline and key in summary["base_means"] else ""
            logger.info("test %s: %.4f%s", key, value, base)


def write_side_by_side(path: Path, base_rows: list[dict], lora_rows: list[dict]) -> None:
    """One row per item: the item's columns, then ``base/<key>`` and ``lora/<key>`` for every score."""
    rows = []
    for base, lora in zip(base_rows, lora_rows, strict=True):
        row = {key: base[key] for key in ("index", "prompt", "ref_paths", "reference_copies")}
        row.update({"base/video": base["video"], "lora/video": lora["video"]})
        row.update({f"base/{key}": value for key, value in base.items() if key not in ROW_COLUMNS})
        row.update({f"lora/{key}": value for key, value in lora.items() if key not in ROW_COLUMNS})
        rows.append(row)
    keys = score_keys(base_rows)
    columns = ["index", "prompt", "ref_paths", "reference_copies", "base/video", "lora/video"]
    columns += [f"{variant}/{key}" for key in keys for variant in ("base", "lora")]
    write_csv(path, rows, columns)


def main(_):
    out_dir = run_inference(FLAGS.config, config_flags.get_config_filename(FLAGS["config"]))
    if PartialState().is_main_process:
        print(out_dir)


if __name__ == "__main__":
    app.run(main)
