"""The tiny world's identity reward model: the real Qwen2.5-VL reward-token model at toy size,
trained by the project's own entry point (:mod:`vace_reward.train_reward`) on the world's
preference pairs (:mod:`identity_grpo.world.preferences`).

:func:`build_world_reward_model` writes the pairs to a temporary folder, builds a small random
reward model (:func:`vace_reward.testing.build_tiny_reward_model` with the sizes of
:class:`WorldRewardSettings`), trains it with ``vace_reward.train_reward`` and leaves the final
model, in the standard layout, at ``out_dir`` (what ``config.pretrained.reward_model`` takes),
with ``world_reward.json`` beside its weights: the settings and the held-out accuracies.

Command line: ``python -m identity_grpo.world.reward OUT_DIR [--seed 0] [--generator WAN_VACE_DIR]
[--caption-steps N] [--samples-per-scene K] [--epochs E]``. The shipped models are
``--generator dataset/tiny_world/models/wan_vace --seed S`` for seeds 0-3, the other options at
their defaults (what ``scripts/build_tiny_world.py`` runs).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from identity_grpo.world.preferences import (
    DISTORTION_KINDS,
    GENERATED_KINDS,
    KINDS,
    SWAP_KINDS,
    TIE_KINDS,
    read_kinds,
    split_identities,
    write_pairs,
    write_preference_set,
)

logger = logging.getLogger(__name__)

# The reward token alone, with an empty system turn: the fixed text is ~20 tokens instead of
# ~100, so the 48 vision tokens are most of what the reward token attends to. Measured alone (on
# the old 2-layer model) it made no difference; it is part of the setting that learned, with the
# backbone sizes below. Saved with the model, so it is what the model is always scored with.
WORLD_INSTRUCTION = "<|SA_reward|>"
WORLD_SYSTEM_PROMPT = ""
SUMMARY_NAME = "world_reward.json"
# The world's reward ensemble, each in models/identity_reward_seed<seed>: the tiny_world preset
# trains on the mean of the four. On the mean of two (seeds 0 and 1, or 2 and 3) GRPO was
# reward-hacked for 0 and 2 of 4 seeds, on the mean of four for none (docs/tiny_world.md).
REWARD_ENSEMBLE_SEEDS = (0, 1, 2, 3)


def reward_model_folder(seed: int) -> str:
    """The folder name, under the world's ``models/``, of its reward model of ``seed``."""
    return f"identity_reward_seed{seed}"


@dataclass
class WorldRewardSettings:
    """Data, model sizes and training of the world's reward model (the defaults are the build's).

    Measured on one shared CPU core (held-out swapped-identity accuracy, 90 pairs): the
    build_backbone defaults (2 layers of width 32, init std 0.02) at 56 px stayed at 0.53-0.62
    whatever the learning rate; at 3e-3 every video got the same score within 150 steps. A random
    backbone of init std 0.02 barely mixes tokens, so little gradient reaches the comparison of
    video and references; 4 layers of width 64 at init std 0.1 (and 112 px, 2 frames, the short
    text) learned it. With the "bt" loss no tie is ever predicted: tie accuracy is 0 by design.
    Drawn pairs only (no generator), no captioning, 3 epochs, seed 0: held-out swap accuracy 0.82,
    distortion 0.88 (210 pairs, 8.5 minutes in all); 1400 pairs x 6 epochs gave 0.77 / 0.83, 4200
    pairs x 2 epochs 0.76 / 0.90. But such models rank two of the generator's own samples of the
    same references, what a GRPO group compares, only about 58-60% right; the defaults (with a
    generator) add captioning, four samples a scene and 2 epochs for that (docs/tiny_world.md).
    """

    seed: int = 0
    # Drawn preference pairs (see identity_grpo.world.preferences): training and held-out.
    num_train_pairs: int = 2800
    num_eval_pairs: int = 210
    # Scenes of pairs between the generator's own samples (identity_grpo.world.generated_pairs;
    # about 1.3 pairs a scene), used when a generator folder is given: training (training
    # identities) and held-out (all 24 people). 0: none.
    num_generated_train_scenes: int = 1600
    num_generated_eval_scenes: int = 320
    # Pairs whose identity-check scores differ by less than this are dropped.
    generated_margin: float = 0.05
    # Samples of each training scene from its references: every two make a generated_same pair.
    # 4 (with captioning and 2 epochs): held-out same-reference pairs 0.62-0.70 (seeds 0-3) against
    # 0.58 with 2, and GRPO on one such model raised identity in 7 of 8 runs
    # (docs/tiny_world_reward_history.md).
    generated_samples_per_scene: int = 4
    # Kinds trained on. The "bt" loss gives tied pairs zero loss, so they only cost time.
    train_kinds: tuple[str, ...] = SWAP_KINDS + DISTORTION_KINDS + GENERATED_KINDS
    # Every reference and frame is resized to this many pixels. 112 x 112: 4 x 4 merged tokens
    # (28 px each), so a 32-px frame's face (8 px) spans about one token; at 56 x 56 a whole frame
    # was 2 x 2 tokens.
    pixels: int = 112 * 112
    # Frames of each video the model reads (sampled from the world's 5; 2 = one temporal patch,
    # half the video tokens of 4, and the people barely differ between frames).
    num_frames: int = 2
    # Overrides of vace_reward.testing.build_backbone's text / vision configs. Width 128 with 8
    # heads was slower and no better; init std 0.2 memorised (0.57 held out).
    text_sizes: dict = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": 4, "initializer_range": 0.1})
    vision_sizes: dict = field(default_factory=lambda: {"out_hidden_size": 64, "initializer_range": 0.1})
    # vace_reward.train_reward options. "btt" (ties) drove the old model to predict a tie for
    # every pair; learning rates of 3e-3 collapsed every score to one value.
    loss: str = "bt"
    tie_theta: float = 3.0
    lora_r: int = 8
    lora_alpha: int = 16
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-3
    vision_learning_rate: float = 1e-3
    batch_size: int = 8
    # 2: with four samples a scene the generated pairs are about 7300 (3 for the drawn pairs alone).
    num_epochs: int = 2
    # Steps (of 16 drawn samples) of captioning before the preference training
    # (identity_grpo.world.reward_pretraining): the toy counterpart of a pretrained backbone
    # (attribute words right 0.99 for pictures, 0.96 for the video's people). 0: none.
    caption_steps: int = 1500
    caption_learning_rate: float = 1e-3

    @property
    def eval_theta(self) -> float:
        """Tie parameter to predict outcomes with: ``tie_theta`` under "btt", else 1 (no ties)."""
        return self.tie_theta if self.loss == "btt" else 1.0


def select_kinds(pairs_csv: Path, kinds: tuple[str, ...], out_csv: Path) -> Path:
    """Copy the rows of a world preference CSV whose kind is in ``kinds`` to ``out_csv`` (same
    folder, so the relative media paths still resolve); return ``out_csv``."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"train_kinds {unknown} are not pair kinds; use some of {KINDS}")
    with open(pairs_csv, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    kind_column = header.index("kind")
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(row for row in rows if row[kind_column] in kinds)
    return out_csv


def concatenate_csvs(out_csv: Path, *csvs: Path) -> Path:
    """Write the rows of ``csvs`` (same header, same folder) one after another to ``out_csv``."""
    rows = []
    for index, path in enumerate(csvs):
        with open(path, newline="", encoding="utf-8") as handle:
            header, *body = list(csv.reader(handle))
        rows += ([header] if index == 0 else []) + body
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return out_csv


def add_generated_pairs(root: Path, generator_dir: str | Path, settings: WorldRewardSettings) -> tuple[Path, Path]:
    """Write the generator's own pairs (training identities for training, all people held out)
    to ``root`` as ``gen_train.csv`` / ``gen_eval.csv``; their streams are seeded ``2 seed + 11``
    and ``2 seed + 12``, apart from the drawn pairs' ``2 seed`` and ``2 seed + 1``."""
    from identity_grpo.world.generated_pairs import generated_pairs, load_world_pipeline

    pipeline = load_world_pipeline(generator_dir)
    train_identities, all_identities = split_identities()
    train = generated_pairs(pipeline, settings.num_generated_train_scenes, 2 * settings.seed + 11, train_identities,
                            margin=settings.generated_margin, samples_per_scene=settings.generated_samples_per_scene)
    held_out = generated_pairs(pipeline, settings.num_generated_eval_scenes, 2 * settings.seed + 12, all_identities,
                               margin=settings.generated_margin)
    return write_pairs(root, "gen_train", train), write_pairs(root, "gen_eval", held_out)


def init_reward_model(folder: Path, settings: WorldRewardSettings) -> dict:
    """Write the starting model (standard layout) to ``folder``: random, then captioning-pretrained
    for ``settings.caption_steps`` steps on the training identities. Returns the captioning's
    losses and held-out attribute accuracies (empty without captioning)."""
    from vace_reward.testing import build_tiny_reward_model

    model, processor = build_tiny_reward_model(
        seed=settings.seed, num_frames=settings.num_frames, min_pixels=settings.pixels, max_pixels=settings.pixels,
        text_sizes=settings.text_sizes, vision_sizes=settings.vision_sizes)
    model.config = dataclasses.replace(model.config, instruction=WORLD_INSTRUCTION, system_prompt=WORLD_SYSTEM_PROMPT)
    captioning = {}
    if settings.caption_steps > 0:
        from identity_grpo.world.reward_pretraining import caption_accuracy, pretrain_backbone

        train_identities, _ = split_identities()
        losses = pretrain_backbone(model, processor, train_identities, steps=settings.caption_steps,
                                   learning_rate=settings.caption_learning_rate, seed=settings.seed)
        accuracy = caption_accuracy(model, processor, train_identities, seed=settings.seed + 1000)
        captioning = {"losses": losses, "held_out_attribute_accuracy": accuracy}
        logger.info("captioning: loss %.3f -> %.3f, held-out attribute words right: %s", losses[0], losses[-1],
                    accuracy)
    model.save_pretrained(folder, processor=processor)
    return captioning


def train_arguments(settings: WorldRewardSettings, train_csv: Path, eval_csv: Path, init: Path,
                    output_dir: Path) -> list[str]:
    """The ``python -m vace_reward.train_reward`` command line of a world build."""
    return [
        "--train-csv", str(train_csv), "--eval-csv", str(eval_csv), "--init", str(init),
        "--output-dir", str(output_dir), "--loss", settings.loss, "--tie-theta", str(settings.tie_theta),
        "--lora-r", str(settings.lora_r), "--lora-alpha", str(settings.lora_alpha), "--lora-dropout", "0.0",
        "--train-vision", "--learning-rate", str(settings.learning_rate),
        "--head-learning-rate", str(settings.head_learning_rate),
        "--vision-learning-rate", str(settings.vision_learning_rate),
        "--batch-size", str(settings.batch_size), "--gradient-accumulation-steps", "1",
        "--num-epochs", str(settings.num_epochs), "--save-every", "1000000", "--seed", str(settings.seed),
    ]


@torch.no_grad()
def evaluate_world_reward(model_dir: str | Path, pairs_csv: str | Path, tie_theta: float,
                          batch_size: int = 16) -> dict[str, float]:
    """Held-out pairwise accuracy of a reward model folder on a world preference CSV, scored by
    :class:`vace_reward.inference.IdentityRewardScorer` and measured by
    :func:`vace_reward.losses.pairwise_accuracy`.

    Returns ``accuracy`` (all pairs; ties are right only when a tie is predicted under
    ``tie_theta``), ``accuracy_decisive`` (A/B pairs, ties excluded), ``accuracy_preferred``
    (A/B pairs, the preferred video scored higher, whatever the tie band), then per kind
    ``<kind>/accuracy`` and the groups ``swap/``, ``distortion/`` and ``tie/``.
    """
    from vace_reward.data import read_preference_csv
    from vace_reward.inference import IdentityRewardScorer
    from vace_reward.losses import pairwise_accuracy

    pairs = read_preference_csv(pairs_csv)
    kinds = read_kinds(pairs_csv)
    scorer = IdentityRewardScorer.from_pretrained(model_dir, batch_size=batch_size)
    references = [pair.reference_paths for pair in pairs]
    prompts = [pair.prompt for pair in pairs]
    reward_a = scorer.score_videos([pair.video_a for pair in pairs], references, prompts)[:, 0]
    reward_b = scorer.score_videos([pair.video_b for pair in pairs], references, prompts)[:, 0]
    target = torch.tensor([pair.target for pair in pairs])

    def measure(mask: torch.Tensor) -> dict[str, float]:
        metrics = pairwise_accuracy(reward_a[mask], reward_b[mask], target[mask], theta=tie_theta)
        decisive = mask & (target != 0.5)
        if bool(decisive.any()):
            preferred = torch.where(target[decisive] == 1.0, reward_a[decisive] > reward_b[decisive],
                                    reward_b[decisive] > reward_a[decisive])
            metrics["accuracy_preferred"] = preferred.float().mean().item()
        return metrics

    everything = torch.ones(len(pairs), dtype=torch.bool)
    results = measure(everything)
    groups = {kind: (kind,) for kind in KINDS} | {"swap": SWAP_KINDS, "distortion": DISTORTION_KINDS, "tie": TIE_KINDS,
                                                  "generated": GENERATED_KINDS}
    for group, members in groups.items():
        mask = torch.tensor([kind in members for kind in kinds])
        if bool(mask.any()):
            for key, value in measure(mask).items():
                if key in ("accuracy", "accuracy_preferred", "num_pairs"):
                    results[f"{group}/{key}"] = value
    return results


def build_world_reward_model(out_dir: str | os.PathLike, seed: int = 0,
                             settings: WorldRewardSettings | None = None,
                             generator_dir: str | os.PathLike | None = None) -> dict:
    """Write the world's preference pairs (drawn, and with ``generator_dir`` the world generator's
    own, see :func:`add_generated_pairs`), train the reward model on them with
    ``vace_reward.train_reward`` and put the final model (standard layout) at ``out_dir``.

    ``out_dir`` is replaced only once the new model is complete. Returns the summary also saved
    as ``out_dir/world_reward.json``: settings, the entry point's last evaluation, the held-out
    accuracies of :func:`evaluate_world_reward` and the wall time.
    """
    from vace_reward.train_reward import parse_args, train

    settings = dataclasses.replace(settings or WorldRewardSettings(), seed=seed)
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="world_reward_") as scratch:
        scratch = Path(scratch)
        data = write_preference_set(scratch / "pairs", settings.num_train_pairs, settings.num_eval_pairs, settings.seed)
        train_csv = select_kinds(data.train_csv, settings.train_kinds, data.root / "train_selected.csv")
        eval_csv = data.eval_csv
        if generator_dir is not None and settings.num_generated_train_scenes > 0:
            generated_train, generated_eval = add_generated_pairs(data.root, generator_dir, settings)
            generated_train = select_kinds(generated_train, settings.train_kinds, data.root / "gen_train_selected.csv")
            train_csv = concatenate_csvs(data.root / "train_all.csv", train_csv, generated_train)
            eval_csv = concatenate_csvs(data.root / "eval_all.csv", eval_csv, generated_eval)
        data_seconds = time.time() - start
        logger.info("wrote the preference pairs (%.0f s)", data_seconds)
        init = scratch / "init"
        captioning = init_reward_model(init, settings)
        run = scratch / "run"
        train_metrics = train(parse_args(train_arguments(settings, train_csv, eval_csv, init, run)))
        held_out = evaluate_world_reward(run / "final", eval_csv, settings.eval_theta)
        summary = {
            "settings": dataclasses.asdict(settings),
            **({"captioning": captioning} if captioning else {}),
            "train_eval": train_metrics,
            "held_out": held_out,
            "data_seconds": round(data_seconds, 1),
            "wall_seconds": round(time.time() - start, 1),
        }
        (run / "final" / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
        (run / "final" / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes())
        # Move into place through a sibling folder, so out_dir never holds half a model.
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            shutil.copytree(run / "final", staging / "model")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.rename(staging / "model", out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("world reward model at %s: held-out swap accuracy %.3f, all pairs %.3f (%.0f s)", out_dir,
                held_out.get("swap/accuracy", math.nan), held_out["accuracy"], summary["wall_seconds"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the trained reward model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator", default=None,
                        help="the world generator folder (e.g. dataset/tiny_world/models/wan_vace): also train on "
                             "pairs of its own samples; without it, drawn pairs only")
    parser.add_argument("--caption-steps", type=int, default=WorldRewardSettings.caption_steps,
                        help="steps of captioning pretraining of the backbone before the preference training "
                             "(identity_grpo.world.reward_pretraining; 0: none)")
    parser.add_argument("--samples-per-scene", type=int, default=WorldRewardSettings.generated_samples_per_scene,
                        help="with --generator: samples of each training scene from its references; every two "
                             "make a pair of samples of the same references (K samples: K (K - 1) / 2 pairs)")
    parser.add_argument("--epochs", type=int, default=WorldRewardSettings.num_epochs,
                        help="epochs of preference training")
    args = parser.parse_args()
    if args.caption_steps < 0:
        parser.error(f"--caption-steps must be >= 0, got {args.caption_steps}")
    if args.samples_per_scene < 2:
        parser.error(f"--samples-per-scene must be >= 2 (a pair), got {args.samples_per_scene}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorldRewardSettings(caption_steps=args.caption_steps, generated_samples_per_scene=args.samples_per_scene,
                                   num_epochs=args.epochs)
    summary = build_world_reward_model(args.out_dir, seed=args.seed, settings=settings, generator_dir=args.generator)
    print(json.dumps(summary["held_out"], indent=2))


if __name__ == "__main__":
    main()
