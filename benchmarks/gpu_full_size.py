"""Full-size timings on a CUDA GPU (random weights, bf16): the Wan2.1-VACE-1.3B architecture and a
Qwen2.5-VL-3B-shaped reward model, at the training size 240x416x33, 25 steps, 4 videos.

For each diffusers attention backend that loads (``native`` = torch SDPA choosing its kernel,
``_native_flash`` / ``_native_cudnn`` / ``_native_efficient`` = SDPA forced to one kernel,
``flash`` = the flash-attn 2 package, ``_native_math`` = SDPA without fused kernels) it reports:

- seconds per rollout video: the train script's rollout (stacked CFG, SDE on every step, VAE
  encode of the references and decode of the videos included), batch 4;
- seconds per transformer call and its model FLOPs utilisation (MFU);
- seconds per trained timestep: ``train_wan2_1_vace.step_loss`` (policy with gradients + frozen
  KL reference) and its backward, LoRA r32 on attention, gradient checkpointing on, and its MFU;
- seconds per reward video (the reward model scoring 4 videos in one batch);
- peak CUDA memory of the rollout and of the trained step (everything allocated, weights included).

FLOPs are COUNTED, not estimated, by ``torch.utils.flop_counter``: one transformer call with the
exact inputs of a rollout step, and one trained step (forward, backward, reference) on one video
with gradient checkpointing off, times the batch: model FLOPs, so checkpointing's recomputation
is not credited. MFU = FLOPs / seconds / peak; the peak defaults to 989 TFLOP/s, the dense bf16
figure NVIDIA gives for the H100 and H200 SXM (``--peak-tflops``).

UMT5-XXL is not built: random prompt embeddings of its output shape stand in (the prompts are
encoded once per sampling batch, a small part of an epoch).

    python benchmarks/gpu_full_size.py            # on a GPU: a few minutes
    python benchmarks/gpu_full_size.py --smoke    # the same code at toy sizes, on any device (checks the script)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import common
import torch

WAN_VACE_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024, vace_layers=list(range(0, 30, 2)), vace_in_channels=96,
)
# Qwen2.5-VL-3B-Instruct's text and vision sizes (its config.json); the tokenizer stays the tiny one.
QWEN2_5_VL_3B_TEXT = dict(
    vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128_000,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                            out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31])
# The released identity reward model's pixel limits per image / frame.
RELEASED_PIXELS = dict(min_pixels=128 * 28 * 28, max_pixels=399_360)


@dataclass(frozen=True)
class Shapes:
    transformer: dict
    height: int
    width: int
    frames: int
    text_tokens: int
    steps: int
    batch: int
    reward_text: dict = field(default_factory=dict)
    reward_vision: dict = field(default_factory=dict)
    reward_pixels: dict = field(default_factory=dict)


FULL = Shapes(WAN_VACE_1_3B, 240, 416, 33, 512, 25, 4, QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, RELEASED_PIXELS)
SMOKE = Shapes(WAN_VACE_1_3B | dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64,
                                    num_layers=2, vace_layers=[0]), 32, 32, 5, 16, 2, 2)


def build_reward_scorer(shapes: Shapes, device, dtype):
    """A Qwen2.5-VL reward model of ``shapes``' sizes (random) behind the real scorer."""
    from vace_reward.inference import IdentityRewardScorer
    from vace_reward.testing import build_tiny_reward_model

    with torch.device(device):
        model, processor = build_tiny_reward_model(num_frames=5, text_sizes=shapes.reward_text,
                                                   vision_sizes=shapes.reward_vision, **shapes.reward_pixels)
    model.backbone.to(dtype)  # as IdentityRewardModel.from_pretrained loads: the backbone in dtype, the head in fp32
    return IdentityRewardScorer(model.eval(), processor, batch_size=shapes.batch)


def cast_as_loaded(model, dtype):
    """``model`` in ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` leaves it: parameters and
    buffers of the modules diffusers keeps in fp32 (norms, time embedder, RoPE) stay fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


class FirstCall:
    """Keeps the keyword arguments of a module's first call after :meth:`arm` (a forward pre-hook)."""

    def __init__(self, module):
        self.kwargs = None
        self.armed = False
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def arm(self):
        self.kwargs, self.armed = None, True

    def _hook(self, module, args, kwargs):
        if self.armed:
            self.kwargs, self.armed = dict(kwargs), False


def count_flops(transformer, fn) -> int:
    """FLOPs of ``fn()``, forward and any backward it runs, counted by ``torch.utils.flop_counter``.
    Attention runs through SDPA's fused kernels on CUDA (the counter knows them, forward and
    backward) and through its math path elsewhere (the counter does not know the fused CPU kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer.set_attention_backend("native" if torch.cuda.is_available() else "_native_math")
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(fn, repeats: int = 1) -> tuple[float, float]:
    """Median seconds of ``repeats`` calls (device synchronised) and the peak CUDA memory (GiB,
    every allocation, weights included) while they ran; NaN memory without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = common.interleaved({"fn": fn}, repeats, warmup=0)["fn"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return common.median(seconds), peak


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on any device: checks the script, not the speed")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (TFLOP/s)")
    parser.add_argument("--backends", default="native,_native_flash,_native_cudnn,_native_efficient,flash,_native_math")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_full_size.py needs a CUDA GPU (full-size Wan2.1-VACE-1.3B in bf16); none is visible here. "
                 "`--smoke` runs the same code at toy sizes; the CPU benchmarks are in benchmarks/README.md.")
    common.setup(args)
    from accelerate import Accelerator
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    from identity_grpo.models import add_lora
    from identity_grpo.pipelines.vace import SDEConfig, VaceRolloutPipeline
    from identity_grpo.testing import build_scheduler, build_text_encoder, build_tokenizer

    shapes = SMOKE if args.smoke else FULL
    device = common.device()
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    script = common.train_script()
    config = common.preset("vace")
    config.sample.num_steps = shapes.steps
    config.sample.train_batch_size = config.sample.num_image_per_prompt = shapes.batch
    config.train.gradient_checkpointing = True

    with torch.device(device):
        transformer = cast_as_loaded(WanVACETransformer3DModel(**shapes.transformer), dtype)
        transformer.eval().requires_grad_(False)
        vae = AutoencoderKLWan().eval().requires_grad_(False)  # the default config is Wan2.1's VAE (fp32, as loaded)
    tokenizer = build_tokenizer()
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer)).to(device), vae=vae,
                           transformer=transformer, scheduler=build_scheduler())
    pipeline = VaceRolloutPipeline(pipe, dtype=dtype)
    text_dim = shapes.transformer["text_dim"]
    prompt_embeds = torch.randn(shapes.batch, shapes.text_tokens, text_dim, device=device, dtype=dtype)
    pipeline._negative_cache[("", shapes.text_tokens)] = torch.randn(1, shapes.text_tokens, text_dim, device=device,
                                                                     dtype=dtype)
    refs = [common.reference_images(1) for _ in range(shapes.batch)]
    prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(shapes.batch)]
    first_call = FirstCall(transformer)
    peft_model = add_lora(transformer, config)
    peft_model.enable_gradient_checkpointing()
    pipeline.transformer = peft_model
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    scorer = build_reward_scorer(shapes, device, dtype)
    accelerator = Accelerator(mixed_precision="bf16")  # the train script's autocast and unwrap_model
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e9:.3f} B parameters; "
          f"reward model: {sum(p.numel() for p in scorer.model.parameters()) / 1e9:.3f} B parameters")

    def rollout():
        return pipeline(prompts, refs, height=shapes.height, width=shapes.width, num_frames=shapes.frames,
                        num_inference_steps=shapes.steps, guidance_scale=config.sample.guidance_scale,
                        max_sequence_length=shapes.text_tokens, prompt_embeds=prompt_embeds,
                        generator=torch.Generator().manual_seed(0), sde=SDEConfig())

    first_call.arm()
    rollouts, frames = rollout()  # also the warm-up of the default backend
    call_kwargs = first_call.kwargs
    with torch.no_grad():
        call_flops = count_flops(transformer, lambda: transformer(**call_kwargs))
    elements, _, *latent_size = call_kwargs["hidden_states"].shape
    tokens = latent_size[0] * latent_size[1] * latent_size[2] // 4  # patch 1x2x2
    print(f"one transformer call: {elements} elements (stacked CFG) x {tokens} tokens, {call_flops / 1e12:.2f} TFLOP "
          f"(counted); peak assumed {args.peak_tflops:.0f} TFLOP/s")
    advantages = torch.linspace(-1, 1, shapes.batch, device=device)

    def train_step(step: int = 0, videos=rollouts, video_advantages=advantages):
        peft_model.train()
        with accelerator.autocast():
            loss, _ = script.step_loss(config, accelerator, pipeline, peft_model, videos, video_advantages, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Model FLOPs of a trained step: counted on one video without gradient checkpointing (whose
    # recomputation is hardware work, not model work), times the batch. The backward of frozen
    # base layers computes input gradients only, so this is well under 3x forward + 1x reference.
    peft_model.disable_gradient_checkpointing()
    step_flops = count_flops(transformer, lambda: train_step(0, rollouts.select(torch.tensor([0])),
                                                             advantages[:1])) * shapes.batch
    peft_model.enable_gradient_checkpointing()
    print(f"one trained step (policy forward + backward + KL reference, {shapes.batch} videos): "
          f"{step_flops / 1e12:.2f} TFLOP = {step_flops / call_flops:.2f} transformer calls")

    def reward():
        return scorer.score_frames(frames, refs, prompts)

    rows = []
    for backend in args.backends.split(","):
        try:
            transformer.set_attention_backend(backend)
            with torch.no_grad():
                transformer(**call_kwargs)
        except Exception as error:  # backend not installed / not supported on this device
            print(f"backend {backend}: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            continue
        with torch.no_grad():
            call_seconds, _ = measure(lambda: transformer(**call_kwargs), repeats=5)
        rollout()  # warm-up with this backend
        rollout_seconds, rollout_peak = measure(rollout)
        train_step()
        step_seconds, train_peak = measure(lambda: train_step(shapes.steps // 2), repeats=3)
        reward()
        reward_seconds, _ = measure(reward, repeats=3)
        peak = args.peak_tflops * 1e12
        rows.append([backend, f"{rollout_seconds / shapes.batch:.2f}", f"{call_seconds:.3f}",
                     f"{call_flops / call_seconds / peak:.1%}", f"{step_seconds:.2f}",
                     f"{step_flops / step_seconds / peak:.1%}", f"{reward_seconds / shapes.batch:.3f}",
                     f"{rollout_peak:.1f}", f"{train_peak:.1f}"])
        print(f"  {backend}: done", flush=True)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{device} (smoke run: toy sizes)"
    print(f"\n{name}: {shapes.height}x{shapes.width}x{shapes.frames}, {shapes.steps} steps, {shapes.batch} videos, "
          f"CFG {config.sample.guidance_scale} stacked, LoRA r{config.train.lora_rank}, gradient checkpointing on")
    print(common.table(["attention", "s / rollout video", "s / transformer call", "call MFU", "s / trained step",
                        "train MFU", "s / reward video", "rollout peak GiB", "train peak GiB"], rows))


if __name__ == "__main__":
    main()
