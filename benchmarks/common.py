"""Shared pieces of the benchmarks: interleaved timing with medians, model sizes, the training
parts built the way ``train_wan2_1_vace.train()`` builds them, memory and table printing.

Benchmarks are not tests: they print ratios measured side by side in one process, the
variants alternating within every repeat so that load from other users of a shared machine
hits all variants alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.chdir(REPO)  # configs name the dataset and tiny model folders relative to the repository

import torch


# ---------------------------------------------------------------------------------- arguments
def parser(description: str) -> argparse.ArgumentParser:
    """``--full`` (bigger sizes, more repeats), ``--repeats``, ``--threads``."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--full", action="store_true", help="bigger sizes and more repeats (minutes, not seconds)")
    result.add_argument("--repeats", type=int, default=0, help="timed repeats per variant (0: the script's default)")
    result.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return result


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine())


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()}), {device}; torch {torch.__version__}; "
            f"load average {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------------------------- timing
def device() -> torch.device:
    """Where the benchmarks run their models: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each variant. Every repeat runs every variant once, the order
    rotating from repeat to repeat, so slow phases of a shared machine hit all variants."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            variants[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median [min-max]`` in ms."""
    return f"{median(values) * 1e3:8.1f} ms [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]"


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repeat ratios (each pair ran back to back)."""
    return median([a / b for a, b in zip(numerator, denominator)])


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    """A model and video size: ``tiny`` is the repository's test model, ``medium`` a bigger random
    transformer (same tokenizer, text encoder and VAE), ``large`` for ``--full`` runs."""

    name: str
    height: int
    width: int
    frames: int
    num_layers: int = 2
    heads: int = 2
    head_dim: int = 8
    ffn_dim: int = 32

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def tokens(self, num_references: int = 1) -> int:
        """Transformer sequence length: latent frames (+ references) x (h/8/2) x (w/8/2)."""
        return ((self.frames - 1) // 4 + 1 + num_references) * (self.height // 16) * (self.width // 16)


TINY = Size("tiny", 32, 32, 5)
MEDIUM = Size("medium", 64, 64, 9, num_layers=4, heads=4, head_dim=32, ffn_dim=512)
LARGE = Size("large", 96, 96, 13, num_layers=6, heads=8, head_dim=32, ffn_dim=1024)
SIZES = {size.name: size for size in (TINY, MEDIUM, LARGE)}


def build_vace_transformer(size: Size, seed: int = 0):
    """A random ``WanVACETransformer3DModel`` of ``size`` (tiny: the repository's own)."""
    from diffusers import WanVACETransformer3DModel

    from identity_grpo.testing import TINY_TEXT_DIM, TINY_Z_DIM
    from identity_grpo.testing import build_vace_transformer as tiny

    torch.manual_seed(seed)
    if size.name == "tiny":
        return tiny()
    every = max(1, size.num_layers // 2)
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=size.heads, attention_head_dim=size.head_dim,
        in_channels=TINY_Z_DIM, out_channels=TINY_Z_DIM, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=size.ffn_dim,
        num_layers=size.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=64, vace_layers=list(range(0, size.num_layers, every)), vace_in_channels=2 * TINY_Z_DIM + 64,
    ).eval()


def build_stock_pipeline(size: Size, seed: int = 0):
    """diffusers' ``WanVACEPipeline`` with the tiny tokenizer / text encoder / VAE and a transformer of
    ``size``, on :func:`device`."""
    from identity_grpo.testing import build_tiny_vace_pipeline

    pipe = build_tiny_vace_pipeline(seed)
    if size.name != "tiny":
        pipe.transformer = build_vace_transformer(size, seed)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    return pipe.to(device())


def reference_images(count: int):
    """``count`` RGB references from the repository's synthetic dataset (cycled)."""
    from PIL import Image

    paths = sorted((REPO / "dataset" / "generated_img").glob("*.png"))
    return [Image.open(paths[index % len(paths)]).convert("RGB") for index in range(count)]


PROMPTS = ["a man with short dark hair walks in the park", "a woman with long red hair smiles in the room",
           "two people talk together on the street", "a person with blond hair walks and talks"]


# ---------------------------------------------------------------------------------- configs
def preset(name: str):
    """A preset of ``config/dgx.py`` (``tiny``, ``vace``, ...)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_dgx_config", REPO / "config" / "dgx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def on_tiny_models(config):
    """``config`` with the tiny offline models and tiny sizes, keeping its step/batch structure."""
    tiny = preset("tiny")
    config.pretrained.model = tiny.pretrained.model
    config.pretrained.reward_model = tiny.pretrained.reward_model
    config.pretrained.build_tiny = True
    config.mixed_precision = "no"
    for prefix in ("", "eval_"):
        config[prefix + "height"], config[prefix + "width"], config[prefix + "frames"] = 32, 32, 5
    config.sample.max_sequence_length = tiny.sample.max_sequence_length
    config.train.gradient_checkpointing = False
    config.train.ema = False
    config.reward_fn = {"ref_tone": 1.0}
    config.eval_freq = 0
    config.save_freq = 0
    config.tracker = ""
    return config


# ---------------------------------------------------------------------------------- training parts
@dataclass
class TrainingParts:
    """What ``train()`` builds before its epoch loop (a single process, no trackers)."""

    config: object
    accelerator: object
    pipeline: object
    transformer: object  # peft-wrapped, accelerator-prepared
    base_transformer: object  # the diffusers module inside (hooks go here)
    optimizer: object
    ema: object
    dataset: object
    sampler: object
    reward_fn: object
    executor: object


def build_training_parts(config, size: Size = TINY) -> TrainingParts:
    """Build the parts as ``train_wan2_1_vace.train()`` does; ``size`` swaps in a bigger random
    transformer (then ``config``'s height/width/frames should match ``size``)."""
    from concurrent.futures import ThreadPoolExecutor

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers.training_utils import EMAModel

    from identity_grpo.configuration import num_train_steps, validate_config
    from identity_grpo.data import ReferenceVideoDataset
    from identity_grpo.models import DTYPES, add_lora, load_vace_pipeline
    from identity_grpo.pipelines.vace import VaceRolloutPipeline
    from identity_grpo.rewards import build_reward_fn
    from identity_grpo.sampling import KRepeatSampler

    # Several configurations in one process: start each from a fresh accelerate state.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.train.gradient_accumulation_steps * num_train_steps(config))
    validate_config(config, accelerator.num_processes)
    dtype = DTYPES[config.mixed_precision]
    pipe = load_vace_pipeline(config, accelerator.device, dtype)
    if size.name != "tiny":
        pipe.transformer = build_vace_transformer(size).to(accelerator.device, dtype).requires_grad_(False)
    pipeline = VaceRolloutPipeline(pipe, dtype=dtype)
    base_transformer = pipeline.transformer
    transformer = add_lora(pipeline.transformer, config)
    if config.get("algorithm", "grpo") != "grpo":
        from identity_grpo.old_policy import add_old_policy

        add_old_policy(transformer)
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    pipeline.transformer = transformer
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2),
                                  weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    ema = EMAModel(trainable, decay=config.train.ema_decay) if config.train.ema else None
    dataset = ReferenceVideoDataset(config.dataset, "train")
    sampler = KRepeatSampler(dataset.reference_counts, batch_size=config.sample.train_batch_size,
                             group_size=config.sample.num_image_per_prompt, num_replicas=accelerator.num_processes,
                             rank=accelerator.process_index, seed=config.seed)
    reward_fn = build_reward_fn(config, accelerator.device)
    return TrainingParts(config, accelerator, pipeline, transformer, base_transformer, optimizer, ema, dataset,
                         sampler, reward_fn, ThreadPoolExecutor(max_workers=1))


def train_script():
    """The train script as a module (its functions: ``sample_epoch``, ``assign_advantages``, ``train_epoch``)."""
    import importlib.util

    if "train_wan2_1_vace" in sys.modules:
        return sys.modules["train_wan2_1_vace"]
    spec = importlib.util.spec_from_file_location("train_wan2_1_vace", REPO / "train_wan2_1_vace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_wan2_1_vace"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run_epoch(parts: TrainingParts, epoch: int = 0, script=None) -> None:
    """One epoch exactly as ``train()`` runs it: sample -> score -> advantages -> update."""
    script = script or train_script()
    p = parts
    p.transformer.eval()
    batches = script.sample_epoch(epoch, p.config, p.accelerator, p.pipeline, p.dataset, p.sampler, p.reward_fn,
                                  p.executor)
    script.assign_advantages(batches, p.config, p.accelerator)
    p.transformer.train()
    script.train_epoch(epoch, 0, p.config, p.accelerator, p.pipeline, p.transformer, p.optimizer, p.ema, batches)


class CallCounter:
    """Forward hooks on a module: number of calls and of batch elements (first dim of ``hidden_states``)."""

    def __init__(self, module):
        self.calls = 0
        self.elements = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.elements += int(hidden.shape[0])

    def reset(self):
        self.calls = self.elements = 0

    def remove(self):
        self.handle.remove()
