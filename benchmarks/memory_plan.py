"""Per-GPU memory of GRPO training for Wan2.1-VACE 1.3B and 14B, from the real model configs.

    python benchmarks/memory_plan.py              # the table (docs/performance.md, "Memory plan")
    python benchmarks/memory_plan.py --validate   # the activation formula against measured peaks

Parts (bytes per GPU):

- weights: the frozen bf16 transformer (parameter count of the real config, built on the meta
  device), plus the VAE (bf16) and, unless ``train.cache_prompt_embeds``, UMT5-XXL (bf16). FSDP2
  shards the transformer over N GPUs (plus one all-gathered block in flight).
- LoRA + optimizer: fp32 LoRA weights, gradients, AdamW's two moments and the EMA copy
  (4 + 4 + 8 + 4 bytes per LoRA parameter), sharded by FSDP2.
- rollouts: what a rank holds between sampling and training: per rollout, S recorded steps of
  (latents, next_latents) in ``sample.store_dtype``, the final state (fp32), the VACE conditioning
  (96 channels, bf16) and the prompt embedding (512 x 4096, bf16), for all
  ``num_batches_per_epoch`` batches, or one batch with ``sample.offload_rollouts``.
- activations: what one training forward keeps for its backward, for the B rollouts of a batch
  with CFG (2B sequences of L tokens):
  without checkpointing ``2B L n_blocks (A dim + F ffn) bytes``, with
  checkpointing ``2B L [(n_main + 2 n_vace) dim + (A dim + F ffn)] bytes`` (each block's input
  is kept, VACE blocks also keep their hint until the main stream uses it, and one block's
  activations exist during its recomputation). A and F (bytes per token per unit of width) are
  the only constants, read off two measured reduced models and checked by ``--validate`` on
  others against peaks measured on the CPU (fp32). The GPU table assumes bf16 autocast (half the
  fp32 bytes; Wan's fp32 norms make that an underestimate of up to ~30 % of the dim-wide part).
- reward model: Qwen2.5-VL-3B (3.75 B parameters, bf16), on the GPU unless
  ``reward_model.offload`` (then it is there only while sampling, not during the update).

Measurement (``--validate``): the CPU allocator's events from ``torch.profiler`` with
``profile_memory=True``: every op's self allocation and every free, in time order, summed; the
peak of that running sum during one forward + backward is the step's peak above what was
allocated before it (the model's weights). Not tracemalloc (torch allocates outside Python's
allocator) and not RSS (glibc keeps freed pages).
"""

from __future__ import annotations

import argparse

import torch

GiB = 1024**3

# The released transformers' configs (diffusers format). 1.3B: Wan-AI/Wan2.1-VACE-1.3B-diffusers;
# 14B: Wan-AI/Wan2.1-VACE-14B-diffusers (the original Wan2.1 14B config: dim 5120, 40 heads, 40
# layers, ffn 13824; VACE blocks at every 5th layer).
COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
              vace_in_channels=96)
REAL_CONFIGS = {
    "1.3B": dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, vace_layers=list(range(0, 30, 2))),
    "14B": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, vace_layers=list(range(0, 40, 5))),
}
VAE_PARAMS = 126_892_531  # AutoencoderKLWan (Wan2.1 VAE)
UMT5_XXL_ENCODER_PARAMS = 5_680_910_336  # google/umt5-xxl encoder as Wan ships it
QWEN25_VL_3B_PARAMS = 3_754_622_976  # Qwen2.5-VL-3B-Instruct (the reward model's backbone)

# Bytes per token per unit of width kept for the backward of one block, fp32: A = 16 dim-wide
# tensors (fp32 norm inputs and outputs, the LoRA'd projections' inputs, q, k, v after norm and
# rotary embedding, attention outputs, modulation products), F = 1 ffn-wide tensor (the GELU
# input: the FFN's frozen projections keep no input for a weight gradient). Read off the first two
# --validate rows (they differ only in ffn_dim: 9,073 and 10,227 bytes per token per block
# measured, so F = 4.5 and A = 62) and rounded to whole tensors; the other rows check them.
ACT_DIM_BYTES_FP32 = 4 * 16
ACT_FFN_BYTES_FP32 = 4 * 1


def transformer(config: dict):
    """The real architecture on the meta device (no memory, exact parameter count)."""
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        return WanVACETransformer3DModel(**config)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_parameter_count(model, rank: int = 32, targets=("to_q", "to_k", "to_v", "to_out.0")) -> int:
    """LoRA parameters of rank ``rank`` on every attention projection named in ``targets``:
    ``rank (d_in + d_out)`` per adapted Linear (self- and cross-attention, main and VACE blocks)."""
    return sum(rank * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets)))


def latent_frames(frames: int, references: int) -> int:
    return (frames - 1) // 4 + 1 + references


def tokens(height: int, width: int, frames: int, references: int) -> int:
    """Sequence length of one sample: latent frames (refs included) x (H / 16) x (W / 16)."""
    return latent_frames(frames, references) * (height // 16) * (width // 16)


def activation_bytes(config: dict, sequences: int, length: int, *, checkpointing: bool, bytes_scale: float = 1.0) -> float:
    """What one forward keeps for the backward (see the module docstring); ``bytes_scale`` 1.0 for
    fp32, 0.5 for bf16 autocast."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    main, vace = config["num_layers"], len(config["vace_layers"])
    block = (ACT_DIM_BYTES_FP32 * dim + ACT_FFN_BYTES_FP32 * config["ffn_dim"]) * bytes_scale
    if checkpointing:
        per_token = 4 * bytes_scale * dim * (main + 2 * vace) + block
    else:
        per_token = (main + vace) * block
    return sequences * length * per_token


def rollout_bytes(height: int, width: int, frames: int, references: int, *, steps: int, store_bytes: int,
                  text_tokens: int = 512, text_dim: int = 4096) -> int:
    """One rollout's record (see identity_grpo.pipelines.base.Rollouts)."""
    state = 16 * latent_frames(frames, references) * (height // 8) * (width // 8)
    conditioning = 96 // 16 * state  # 2 z + 64 channels per latent pixel, bf16
    return 2 * steps * state * store_bytes + 4 * state + 2 * conditioning + 2 * text_tokens * text_dim


def plan(name: str, height: int, width: int, frames: int, *, gpus: int, fsdp: bool, batch: int = 4,
         batches_per_epoch: int = 8, steps: int = 24, references: int = 2, lora_rank: int = 32,
         store_bytes: int = 4, offload_rollouts: bool = False, cache_prompts: bool = False,
         offload_reward: bool = False) -> dict[str, float]:
    """GiB per GPU of each part for one setting."""
    config = REAL_CONFIGS[name]
    model = transformer(config)
    params, lora = parameter_count(model), lora_parameter_count(model, lora_rank)
    shard = gpus if fsdp else 1
    block = params / (config["num_layers"] + len(config["vace_layers"]))
    weights = 2 * params / shard + (2 * block if fsdp else 0) + 2 * VAE_PARAMS
    weights += 0 if cache_prompts else 2 * UMT5_XXL_ENCODER_PARAMS
    length = tokens(height, width, frames, references)
    held = 1 if offload_rollouts else batches_per_epoch
    out = {
        "weights": weights,
        "lora+optim": 20 * lora / shard,
        "rollouts": held * batch * rollout_bytes(height, width, frames, references, steps=steps, store_bytes=store_bytes),
        "act (no ckpt)": activation_bytes(config, 2 * batch, length, checkpointing=False, bytes_scale=0.5),
        "act (ckpt)": activation_bytes(config, 2 * batch, length, checkpointing=True, bytes_scale=0.5),
        "reward model": 0 if offload_reward else 2 * QWEN25_VL_3B_PARAMS,
    }
    out = {k: v / GiB for k, v in out.items()}
    out["total (ckpt)"] = sum(v for k, v in out.items() if k != "act (no ckpt)")
    out.update(params=params, lora=lora, tokens=length)
    return out


# ------------------------------------------------------------------ validation on the CPU

def reduced_model(dim: int, heads: int, layers: int, ffn: int, vace_every: int):
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    return WanVACETransformer3DModel(**dict(
        COMMON, attention_head_dim=dim // heads, num_attention_heads=heads, ffn_dim=ffn, num_layers=layers,
        text_dim=64, freq_dim=32, vace_layers=list(range(0, layers, vace_every))))


def measured_peak(model, batch: int, frames: int, height: int, width: int, checkpointing: bool) -> int:
    """Peak bytes allocated above the starting point during one forward + backward of the model
    with a rank-4 LoRA on the attention projections (as trained), from the profiler's allocator
    events."""
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, 16, frames, height, width, generator=generator)
    control = torch.randn(batch, 96, frames, height, width, generator=generator)
    text = torch.randn(batch, 32, 64, generator=generator)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(hidden_states=hidden, timestep=torch.full((batch,), 500), encoder_hidden_states=text,
                    control_hidden_states=control, return_dict=False)[0]
        out.square().mean().backward()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


VALIDATION = [  # (dim, heads, layers, ffn, vace_every, batch, latent frames, h, w)
    (128, 2, 4, 256, 2, 1, 4, 16, 16),
    (128, 2, 4, 512, 2, 2, 4, 16, 16),
    (256, 4, 6, 640, 3, 1, 3, 16, 24),
    (192, 3, 5, 384, 5, 2, 5, 12, 16),
]


def validate() -> bool:
    ok = True
    print(f"{'model':>28} {'tokens':>7} {'ckpt':>5} {'measured MiB':>13} {'formula MiB':>12} {'error':>7}")
    for dim, heads, layers, ffn, vace_every, batch, frames, height, width in VALIDATION:
        config = dict(num_attention_heads=heads, attention_head_dim=dim // heads, num_layers=layers, ffn_dim=ffn,
                      vace_layers=list(range(0, layers, vace_every)))
        length = frames * (height // 2) * (width // 2)
        for checkpointing in (False, True):
            measured = measured_peak(reduced_model(dim, heads, layers, ffn, vace_every), batch, frames, height, width,
                                     checkpointing)
            predicted = activation_bytes(config, batch, length, checkpointing=checkpointing)
            error = predicted / measured - 1
            ok &= abs(error) <= 0.15
            label = f"dim {dim} x{layers}+{len(config['vace_layers'])} ffn {ffn} B{batch}"
            print(f"{label:>28} {length:>7} {str(checkpointing):>5} {measured / 2**20:>13.2f} "
                  f"{predicted / 2**20:>12.2f} {error:>+7.1%}")
    return ok


def table(gpus: int = 8) -> None:
    sizes = [(240, 416, 33), (480, 832, 81)]
    columns = ["weights", "lora+optim", "rollouts", "act (no ckpt)", "act (ckpt)", "reward model", "total (ckpt)",
               "total, memory flags"]
    print("| model | size (HxWxF) | tokens | parallel | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 4) + "|")
    for name in REAL_CONFIGS:
        for height, width, frames in sizes:
            for fsdp in (False, True):
                row = plan(name, height, width, frames, gpus=gpus, fsdp=fsdp)
                # bf16 rollouts offloaded, prompts cached, reward model offloaded during the update.
                row["total, memory flags"] = plan(name, height, width, frames, gpus=gpus, fsdp=fsdp, store_bytes=2,
                                                  offload_rollouts=True, cache_prompts=True,
                                                  offload_reward=True)["total (ckpt)"]
                parallel = f"FSDP2 x{gpus}" if fsdp else "DDP"
                print(f"| {name} | {height}x{width}x{frames} | {row['tokens']} | {parallel} | "
                      + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    for name in REAL_CONFIGS:
        row = plan(name, 240, 416, 33, gpus=gpus, fsdp=False)
        print(f"{name}: {row['params'] / 1e9:.3f} B transformer parameters, {row['lora'] / 1e6:.1f} M LoRA (rank 32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true", help="compare the activation formula with measured peaks")
    parser.add_argument("--gpus", type=int, default=8, help="N of the FSDP2 rows")
    args = parser.parse_args()
    if args.validate:
        raise SystemExit(0 if validate() else 1)
    table(args.gpus)


if __name__ == "__main__":
    main()
