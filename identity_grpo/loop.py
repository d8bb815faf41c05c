"""Pieces shared by the train and test scripts: rollouts of dataset rows, evaluation, metrics."""

from __future__ import annotations

import datetime
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from identity_grpo.configuration import sde_step_indices, trained_step_indices
from identity_grpo.data import ReferenceVideoDataset
from identity_grpo.pipelines.vace import Rollouts, SDEConfig, VaceRolloutPipeline
from identity_grpo.rewards import CombinedReward, RewardInputs
from identity_grpo.sampling import shard_in_order


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of ``keys`` (seed, epoch, rank, ...), so every
    rollout is reproducible on resume and independent of the device."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sde_config(config) -> SDEConfig:
    return SDEConfig(schedule=config.sample.noise_schedule, noise_level=config.sample.noise_level)


# config.sample.store_dtype -> dtype of the recorded rollout states.
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def reward_models_on(reward_fn: CombinedReward, device: torch.device, offload: bool):
    """With ``offload`` (``reward_model.offload``), the reward models are on ``device`` inside the
    block and on the CPU after it; without, nothing moves. Leave the block only once every
    reward call it started has returned."""
    if offload:
        reward_fn.to(device)
    try:
        yield
    finally:
        if offload:
            reward_fn.to("cpu")


def run_prompts(config, *datasets: ReferenceVideoDataset) -> list[str]:
    """Every prompt a run encodes: the rows' prompts and the negative prompt
    (``train.cache_prompt_embeds`` encodes them once at start-up)."""
    return [dataset[i].prompt for dataset in datasets for i in range(len(dataset))] + [config.sample.negative_prompt]


def rollout_rows(
    pipeline: VaceRolloutPipeline,
    dataset: ReferenceVideoDataset,
    indices: Sequence[int],
    config,
    *,
    generator: torch.Generator,
    group_ids: Sequence[int] | None = None,
    evaluation: bool = False,
    latents: torch.Tensor | None = None,
    step: int = 0,
) -> tuple[Rollouts, RewardInputs]:
    """Generate one video per dataset row in ``indices``.

    Training rollouts use the train size, the SDE steps of global sampling step ``step`` and
    record its trained steps (:func:`~identity_grpo.configuration.sde_step_indices`; window mode
    draws them per sampling step). Evaluation uses the eval size and the deterministic sampler,
    or with ``sample.eval_sde`` the training SDE (then the eval steps must equal the training
    steps), and records nothing.
    """
    items = [dataset[i] for i in indices]
    # Load each row's images once: repeated rows (a group's members) share the same objects,
    # which the pipeline uses to encode their references once.
    loaded = {i: dataset.load_references(i) for i in dict.fromkeys(indices)}
    references = [loaded[i] for i in indices]
    prompts = [item.prompt for item in items]
    prefix = "eval_" if evaluation else ""
    rollouts, frames = pipeline(
        prompts,
        references,
        height=config[prefix + "height"],
        width=config[prefix + "width"],
        num_frames=config[prefix + "frames"],
        num_inference_steps=config.sample.eval_num_steps if evaluation else config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale,
        negative_prompt=config.sample.negative_prompt,
        max_sequence_length=config.sample.max_sequence_length,
        conditioning_scale=config.sample.conditioning_scale,
        group_ids=group_ids,
        sde_steps=[] if evaluation and not config.sample.eval_sde else sde_step_indices(config, step),
        record_steps=[] if evaluation else trained_step_indices(config, step),
        sde=sde_config(config),
        latents=latents,
        generator=generator,
        # Flow-GRPO-Fast: the group's shared ODE prefix is computed once (VACE pipeline only).
        **({"shared_prefix": True} if config.sample.fast_branch and not evaluation else {}),
        store_dtype=STORE_DTYPES[config.sample.store_dtype],
    )
    return rollouts, RewardInputs(frames=frames.cpu(), reference_images=references, prompts=prompts)


@torch.no_grad()
def evaluate(
    pipeline: VaceRolloutPipeline,
    dataset: ReferenceVideoDataset,
    reward_fn: CombinedReward,
    config,
    accelerator,
    *,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """Generation of every test row with fixed initial noise per row: deterministic (ODE), or the
    training SDE with fixed noise when ``sample.eval_sde`` is set.

    Returns ``(means, rows)``: the mean of every reward key over the test set (identical on all
    ranks) and, on every rank, its own rows ``{"index", "prompt", <reward keys>, "frames"}`` (rows
    are sharded by data replica: the ranks of a context-parallel group generate the same rows
    together, and only the group's first rank returns them, so each is written once).
    """
    from tqdm.auto import tqdm

    from identity_grpo.context_parallel import data_ranks

    ranks = data_ranks(accelerator, config)
    # Pad so that every rank runs the same number of batches (collectives must match); padded
    # rows are generated but dropped from the metrics.
    per_rank = -(-len(dataset) // ranks.size)

    def padded_rows(rank: int) -> list[int]:
        rows_of_rank = shard_in_order(len(dataset), num_replicas=ranks.size, rank=rank)
        return rows_of_rank + [rows_of_rank[-1] if rows_of_rank else 0] * (per_rank - len(rows_of_rank))

    mine = shard_in_order(len(dataset), num_replicas=ranks.size, rank=ranks.rank)
    rows_by_rank = [padded_rows(rank) for rank in range(ranks.size)]
    padded = rows_by_rank[ranks.rank]
    keep = [True] * len(mine) + [False] * (per_rank - len(mine))

    def reference_count(index: int) -> int:
        return len(dataset[index].reference_paths)

    batch_size = config.sample.test_batch_size
    rows: list[dict] = []
    totals: dict[str, list[torch.Tensor]] = defaultdict(list)
    bar = tqdm(range(0, per_rank, batch_size), desc="eval", disable=not (progress and accelerator.is_local_main_process))
    for start in bar:
        chunk = list(zip(padded[start : start + batch_size], keep[start : start + batch_size]))
        chunk_everywhere = [i for rows_of_rank in rows_by_rank for i in rows_of_rank[start : start + batch_size]]
        # One batch per reference count that any rank has in this chunk; each row's initial noise
        # depends only on the row. A rank with no row of a count generates one dropped row of it:
        # every rank makes the same transformer calls (under FSDP2 each call all-gathers weights).
        for count in sorted({reference_count(i) for i in chunk_everywhere}):
            indices = [i for i, _ in chunk if reference_count(i) == count]
            kept = torch.tensor([k for i, k in chunk if reference_count(i) == count], dtype=torch.float32)
            if not indices:
                indices, kept = [next(i for i in chunk_everywhere if reference_count(i) == count)], torch.zeros(1)
            latents = torch.cat([
                pipeline.prepare_latents(1, config.eval_height, config.eval_width, config.eval_frames, count,
                                         seeded_generator(config.seed, "eval", i))
                for i in indices
            ])
            _, inputs = rollout_rows(pipeline, dataset, indices, config, evaluation=True, latents=latents,
                                     generator=seeded_generator(config.seed, "eval", *indices))
            scores, _ = reward_fn(inputs)
            for position, index in enumerate(indices):
                if kept[position] and ranks.writes:
                    rows.append({"index": index, "prompt": dataset[index].prompt, "frames": inputs.frames[position],
                                 **{k: float(v[position]) for k, v in scores.items()}})
            for key, value in scores.items():
                totals[key].append(torch.stack([value, kept], dim=1))
    means = {}
    for key in sorted(totals):
        # A context-parallel group's ranks hold the same rows: the duplicates cancel in the ratio.
        local = torch.cat(totals[key]).to(accelerator.device)
        summed = accelerator.reduce((local[:, 0] * local[:, 1]).sum(), "sum")
        count = accelerator.reduce(local[:, 1].sum(), "sum")
        means[key] = float(summed / count)
    return means, rows


def write_video(path: str | Path, frames: torch.Tensor, fps: int) -> None:
    """Write ``(F, H, W, 3)`` uint8 frames as an H.264 mp4."""
    import imageio

    from identity_grpo.checkpoint import reporting_write_errors

    # macro_block_size=16 matches the height/width check of validate_config, so nothing is resized.
    with reporting_write_errors(Path(path), "a video"), imageio.get_writer(
            path, fps=fps, codec="libx264", macro_block_size=16) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)


def write_gallery_item(out_dir: Path, stem: str, frames: torch.Tensor, references, record: dict, fps: int) -> Path:
    """``<stem>.mp4``, its references as ``<stem>_ref<k>.png`` and ``<stem>.json`` (prompt and rewards):
    the layout ``identity_grpo.report`` reads. Returns the video's path."""
    from identity_grpo.tracking import write_json

    video = out_dir / f"{stem}.mp4"
    write_video(video, frames, fps)
    for k, image in enumerate(references):
        image.save(out_dir / f"{stem}_ref{k}.png")
    write_json(out_dir / f"{stem}.json", record)
    return video


def log_rollout_videos(out_dir: Path, inputs: RewardInputs, scores: dict[str, torch.Tensor], count: int, fps: int,
                       *, accelerator=None, step: int = 0) -> None:
    """The first ``count`` videos of a batch as mp4s next to their references (PNG) and rewards;
    with ``accelerator``, also sent to its trackers (:func:`log_videos_to_trackers`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = min(count, inputs.frames.shape[0])
    videos, captions = [], []
    for i in range(count):
        record = {"prompt": inputs.prompts[i], **{key: float(value[i]) for key, value in scores.items()}}
        videos.append(write_gallery_item(out_dir, str(i), inputs.frames[i], inputs.reference_images[i], record, fps))
        captions.append(f"{inputs.prompts[i]} | total {record.get('total', float('nan')):.4f}")
    if accelerator is not None and count:
        log_videos_to_trackers(accelerator, "rollouts", videos, inputs.frames[:count], captions, step)


def log_eval_videos(out_dir: Path, rows: list[dict], dataset: ReferenceVideoDataset, fps: int) -> None:
    """This rank's rows of :func:`evaluate` as ``<row index>.mp4`` with references and rewards: the
    report's before/after gallery pairs the rows of two evaluations by index. Every rank writes
    its own rows (distinct names), so no gather is needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        record = {key: value for key, value in row.items() if key != "frames"}
        write_gallery_item(out_dir, f"{row['index']:05d}", row["frames"], dataset.load_references(row["index"]),
                           record, fps)


def frame_grid(frames: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """``(N, F, H, W, 3)`` uint8 videos as one ``(N * H, k * W, 3)`` image: a row per video, ``k <=
    max_frames`` evenly spaced frames per row (first and last included)."""
    count, num_frames, height, width, channels = frames.shape
    k = min(max_frames, num_frames)
    picks = torch.linspace(0, num_frames - 1, k).round().long()
    chosen = frames[:, picks]  # (N, k, H, W, 3)
    return chosen.permute(0, 2, 1, 3, 4).reshape(count * height, k * width, channels)


def log_videos_to_trackers(accelerator, tag: str, videos: Sequence[Path], frames: torch.Tensor,
                           captions: Sequence[str], step: int) -> None:
    """Videos in the trackers. tensorboard: a frame-grid image (``add_video`` needs moviepy < 2, whose
    ``moviepy.editor`` it imports, and silently logs nothing without it). wandb: the mp4 files as
    ``wandb.Video`` (a file path needs no moviepy; works with ``WANDB_MODE=offline``)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, frame_grid(frames).numpy(), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({tag: [wandb.Video(str(path), caption=caption, format="mp4")
                                   for path, caption in zip(videos, captions)]}, step=step)


def mean_stats(stats: list[dict[str, torch.Tensor]], accelerator) -> dict[str, float]:
    """Average per-call stats locally, then across ranks. A key present in only some calls
    (``grad_norm``: the optimizer-step call of an accumulation window) is averaged over those."""
    out = {}
    for key in dict.fromkeys(key for s in stats for key in s):
        local = torch.stack([s[key].float() for s in stats if key in s]).mean().to(accelerator.device)
        out[key] = float(accelerator.reduce(local, "mean"))
    return out


def make_unique_dir(parent: str | Path, name: str, accelerator) -> Path:
    """Create ``<parent>/<name>_<timestamp>`` (``~1``, ``~2``, ... appended if taken) on the main
    process and return it on every rank: a run never writes into an existing folder."""
    from accelerate.utils import broadcast_object_list

    chosen = [None]
    if accelerator.is_main_process:
        stem = f"{name}_{datetime.datetime.now():%Y%m%d_%H%M%S}"
        path, suffix = Path(parent, stem), 1
        while path.exists():
            path, suffix = Path(parent, f"{stem}~{suffix}"), suffix + 1
        path.mkdir(parents=True)
        chosen[0] = str(path)
    broadcast_object_list(chosen)
    return Path(chosen[0])
