"""Train the identity reward model on pairwise preferences (LoRA on the language model).

    accelerate launch -m vace_reward.train_reward --train-csv data/pairs_train.csv \\
        --eval-csv data/pairs_test.csv --init outputs/identity_reward --output-dir outputs/reward_run

Start either from a reward model (``--init``: standard or upstream release layout) or from a
plain Qwen2.5-VL (``--base-model``: the reward token and a fresh head are added). The CSVs are
preference CSVs (:mod:`vace_reward.data`); both are validated before the model is loaded.

Each step scores the two videos of every pair in one forward pass and applies the Bradley-Terry
(``--loss bt``) or Bradley-Terry-with-ties (``--loss btt``) loss to the first score dimension
(:mod:`vace_reward.losses`). Trainable: LoRA adapters on every linear layer whose name contains
none of ``--lora-exclude`` (default: the language model's projections), the reward head, and the
vision tower with ``--train-vision``. Checkpoints (``checkpoint-N/``) and the final model
(``final/``) are written in the standard layout with the LoRA merged, so ``--model`` of the
scorer and ``config.pretrained.reward_model`` of GRPO take them directly. Metrics go to the log
and to ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from identity_grpo.models import looks_local
from identity_grpo.tracking import append_jsonl
from vace_reward.data import PreferencePair, read_preference_csv
from vace_reward.inference import IdentityRewardScorer, PreparedSample, load_image
from vace_reward.losses import PREFERENCE_LOSSES, pairwise_accuracy, preference_loss
from vace_reward.model import (
    REWARD_CONFIG_NAME,
    UPSTREAM_CONFIG_NAME,
    IdentityRewardModel,
    atomic_save,
    new_reward_model,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainRewardConfig:
    """Every option of a reward-model run (also the command-line flags, ``_`` -> ``-``)."""

    # Preference CSV to train on, and one to evaluate on ("" skips evaluation).
    train_csv: str = ""
    eval_csv: str = ""
    # Where checkpoints, the final model and metrics.jsonl go.
    output_dir: str = "outputs/reward_run"
    # Reward model to start from (standard or upstream layout) ...
    init: str = ""
    # ... or a plain Qwen2.5-VL folder / hub id to start a new reward model from.
    base_model: str = ""
    # "btt" (Bradley-Terry with ties), "bt" (VideoAlign's: tied pairs masked out) or "bt_soft"
    # (ties as the soft label 0.5); tie_theta is the Rao-Kupper tie parameter of "btt" (also used
    # to predict ties when measuring accuracy).
    loss: str = "btt"
    tie_theta: float = 5.0
    # LoRA on the linear layers whose names contain none of lora_exclude.
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_exclude: tuple[str, ...] = ("lm_head", "reward_head", "embed_tokens", "visual")
    # Also train the whole vision tower (at vision_learning_rate; 0 = learning_rate).
    train_vision: bool = False
    learning_rate: float = 2e-6
    head_learning_rate: float = 0.0  # 0 = learning_rate
    vision_learning_rate: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Pairs per device per micro-batch, and micro-batches per optimizer step.
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    num_epochs: int = 3
    # Stop after this many optimizer steps (0: run num_epochs).
    max_steps: int = 0
    # Evaluate / save every this many optimizer steps (0: at the end of every epoch).
    eval_every: int = 0
    save_every: int = 0
    # "no", "fp16" or "bf16" (accelerate autocast); the frozen weights are loaded in this dtype.
    mixed_precision: str = "no"
    # Override the model's frames per video / per-frame pixel bound (0: the model's).
    num_frames: int = 0
    max_frame_pixels: int = 0
    num_workers: int = 0
    seed: int = 42

    def validate(self) -> None:
        """Raise ``ValueError`` naming every unusable option (flag) and what to give instead;
        called before any file is written or model loaded."""
        errors = []
        if not self.train_csv:
            errors.append("--train-csv is required")
        if bool(self.init) == bool(self.base_model):
            errors.append("give exactly one of --init (a reward model) or --base-model (a plain Qwen2.5-VL)")
        elif self.init and not any((Path(self.init) / name).is_file() for name in (REWARD_CONFIG_NAME, UPSTREAM_CONFIG_NAME)):
            what = "does not exist" if not Path(self.init).exists() else (
                f"holds neither {REWARD_CONFIG_NAME} (standard layout) nor {UPSTREAM_CONFIG_NAME} (upstream layout)")
            errors.append(f"--init {self.init!r} {what}; point it at a reward model folder")
        elif self.base_model and looks_local(self.base_model) and not Path(self.base_model).is_dir():
            errors.append(f"--base-model {self.base_model!r} does not exist (a local path, so no hub download is tried)")
        if self.loss not in PREFERENCE_LOSSES:
            errors.append(f"--loss must be one of {PREFERENCE_LOSSES}, got {self.loss!r}")
        if self.loss == "btt" and not self.tie_theta > 1:
            errors.append(f"--tie-theta must be > 1 for the btt loss, got {self.tie_theta}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            errors.append("--batch-size and --gradient-accumulation-steps must be >= 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            errors.append(f"--mixed-precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        # `not x > 0` also catches NaN.
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            errors.append(f"--learning-rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("head_learning_rate", "vision_learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                errors.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("max_steps", "eval_every", "save_every", "num_frames", "max_frame_pixels", "num_workers"):
            if getattr(self, name) < 0:
                errors.append(f"--{name.replace('_', '-')} must be >= 0 (0 = default), got {getattr(self, name)}")
        if self.num_epochs < 1 and self.max_steps == 0:
            errors.append(f"--num-epochs must be >= 1 (or give --max-steps), got {self.num_epochs}")
        if errors:
            raise ValueError("invalid reward-training options:\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------------- data

class PairDataset(Dataset):
    """Pairs read and prepared for the processor: ``(sample_a, sample_b, target)``."""

    def __init__(self, pairs: list[PreferencePair], scorer: IdentityRewardScorer):
        self.pairs = pairs
        self.scorer = scorer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[PreparedSample, PreparedSample, float]:
        pair = self.pairs[index]
        references = [load_image(path) for path in pair.reference_paths]
        sample_a, sample_b = (
            self.scorer.prepare(self.scorer.read_video_file(video), references, pair.prompt)
            for video in (pair.video_a, pair.video_b)
        )
        return sample_a, sample_b, pair.target


class PairCollator:
    """A batch of P pairs -> processor inputs of 2P sequences (all A videos, then all B) + targets."""

    def __init__(self, scorer: IdentityRewardScorer):
        self.scorer = scorer

    def __call__(self, items) -> dict[str, torch.Tensor]:
        samples_a, samples_b, targets = zip(*items)
        batch = self.scorer.process(list(samples_a) + list(samples_b))
        batch["target"] = torch.tensor(targets, dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------- LoRA

def lora_target_modules(module: torch.nn.Module, exclude: tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` layers under ``module`` whose names contain no ``exclude`` entry."""
    return [
        name for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear) and not any(part in name for part in exclude)
    ]


def add_lora(model: IdentityRewardModel, config: TrainRewardConfig) -> list[str]:
    """Inject LoRA adapters into the backbone in place (no wrapper class); return their names."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_modules(model.backbone, tuple(config.lora_exclude))
    if not targets:
        raise ValueError(f"no linear layer left for LoRA after excluding {config.lora_exclude}")
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=targets, bias="none")
    inject_adapter_in_model(lora_config, model.backbone)
    return targets


def merged_backbone_state_dict(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with every LoRA delta added, under the plain (LoRA-free) names."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, tensor in backbone.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach()
    for name, module in backbone.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                weight = state[f"{name}.weight"]
                state[f"{name}.weight"] = (weight.float() + module.get_delta_weight(adapter).float()).to(weight.dtype)
    return {name: tensor.cpu().contiguous() for name, tensor in state.items()}


def trainable_parameter_groups(model: IdentityRewardModel, config: TrainRewardConfig) -> list[dict]:
    """Freeze everything, then unfreeze LoRA, the head and (optionally) the vision tower."""
    model.requires_grad_(False)
    groups = {"lora": [], "head": [], "vision": []}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            groups["lora"].append(parameter)
        elif name.startswith("reward_head."):
            groups["head"].append(parameter)
        elif config.train_vision and ".visual." in name:
            groups["vision"].append(parameter)
    rates = {"lora": config.learning_rate, "head": config.head_learning_rate or config.learning_rate,
             "vision": config.vision_learning_rate or config.learning_rate}
    for parameters in groups.values():
        for parameter in parameters:
            parameter.requires_grad_(True)
            # Trainable weights in float32: AdamW updates of a 2e-6 learning rate vanish in bf16.
            parameter.data = parameter.data.float()
    return [{"params": params, "lr": rates[name], "name": name} for name, params in groups.items() if params]


# ---------------------------------------------------------------------- train / evaluate

def _pair_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {key: value for key, value in batch.items() if key != "target"}
    rewards = model(**inputs)[:, 0]  # (2P,) first dimension
    num_pairs = batch["target"].shape[0]
    return rewards[:num_pairs], rewards[num_pairs:]


@torch.no_grad()
def evaluate(model, loader, accelerator, config: TrainRewardConfig) -> dict[str, float]:
    """Loss and pairwise accuracy (ties counted, see :func:`pairwise_accuracy`) over ``loader``."""
    model.eval()
    rewards_a, rewards_b, targets = [], [], []
    for batch in loader:
        reward_a, reward_b = _pair_rewards(model, batch)
        gathered = accelerator.gather_for_metrics((reward_a.float(), reward_b.float(), batch["target"]))
        for store, value in zip((rewards_a, rewards_b, targets), gathered):
            store.append(value.cpu())
    model.train()
    reward_a, reward_b, target = torch.cat(rewards_a), torch.cat(rewards_b), torch.cat(targets)
    theta = config.tie_theta if config.loss == "btt" else 1.0
    metrics = pairwise_accuracy(reward_a, reward_b, target, theta=theta)
    metrics["loss"] = preference_loss(config.loss, reward_a, reward_b, target, config.tie_theta).item()
    return {f"eval/{key}": value for key, value in metrics.items()}


def train(config: TrainRewardConfig) -> dict[str, float]:
    """Run training; return the last evaluation metrics (or the last training metrics)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    # Validate the data (every image decoded, every video header read) before the output folder
    # is created and the model loads.
    train_pairs = read_preference_csv(config.train_csv)
    eval_pairs = read_preference_csv(config.eval_csv) if config.eval_csv else []
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        logger.info("train config: %s", json.dumps(dataclasses.asdict(config)))

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    if config.init:
        model, processor = IdentityRewardModel.from_pretrained(config.init, dtype=dtype)
    else:
        model, processor = new_reward_model(config.base_model, dtype=dtype, seed=config.seed)
    targets = add_lora(model, config)
    groups = trainable_parameter_groups(model, config)
    model.train()
    logger.info("LoRA on %d linear layers; trainable parameters: %s", len(targets),
                {g["name"]: sum(p.numel() for p in g["params"]) for g in groups})

    scorer = IdentityRewardScorer(model, processor, num_frames=config.num_frames or None,
                                  max_frame_pixels=config.max_frame_pixels or None)
    collate = PairCollator(scorer)
    train_loader = DataLoader(PairDataset(train_pairs, scorer), batch_size=config.batch_size, shuffle=True,
                              collate_fn=collate, num_workers=config.num_workers)
    eval_loader = DataLoader(PairDataset(eval_pairs, scorer), batch_size=config.batch_size, shuffle=False,
                             collate_fn=collate, num_workers=config.num_workers) if eval_pairs else None
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    logger.info("%d train pairs, %d eval pairs; %d optimizer steps (%d per epoch), %d pairs per step",
                len(train_pairs), len(eval_pairs), total_steps, steps_per_epoch,
                config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes)

    def save(name: str) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            atomic_save(unwrapped, processor, output_dir / name, merged_backbone_state_dict(unwrapped.backbone))
            logger.info("saved %s", output_dir / name)

    def log(metrics: dict[str, float]) -> None:
        if accelerator.is_main_process:
            logger.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
            append_jsonl(output_dir / "metrics.jsonl", {"step": step, **metrics})  # a NaN loss is written as null

    step, metrics = 0, {}
    if eval_loader is not None:
        log(evaluate(model, eval_loader, accelerator, config))
    running_loss, running_count = 0.0, 0
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                reward_a, reward_b = _pair_rewards(model, batch)
                loss = preference_loss(config.loss, reward_a, reward_b, batch["target"], config.tie_theta)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            running_loss += loss.item()
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            metrics = {"train/loss": running_loss / running_count}
            running_loss, running_count = 0.0, 0
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if eval_loader is not None and ((config.eval_every and step % config.eval_every == 0)
                                            or (not config.eval_every and end_of_epoch)):
                metrics.update(evaluate(model, eval_loader, accelerator, config))
            log(metrics)
            if (config.save_every and step % config.save_every == 0) or (not config.save_every and end_of_epoch):
                save(f"checkpoint-{step}")
            if step >= total_steps:
                break
    save("final")
    accelerator.end_training()
    return metrics


def parse_args(argv: list[str] | None = None) -> TrainRewardConfig:
    """Flags generated from :class:`TrainRewardConfig` (``--lora-r 64``, ``--train-vision``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(TrainRewardConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "lora_exclude":
            parser.add_argument(flag, nargs="*", default=list(field.default))
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    args["lora_exclude"] = tuple(args["lora_exclude"])
    return TrainRewardConfig(**args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
