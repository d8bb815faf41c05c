"""Full-size timings on a CUDA GPU (random weights, bf16): Wan2.1-VACE-1.3B architecture and a
Qwen2.5-VL-3B-shaped reward model, at the training size 240x416x33, 25 steps.

Reports seconds per rollout video (batch 4, stacked CFG, VAE decode included), seconds per
trained timestep (policy + KL reference + backward, LoRA r32 on attention, gradient
checkpointing on), seconds per reward call, model FLOPs utilisation of the transformer calls and
peak CUDA memory, for each attention backend that loads (``native`` = torch SDPA with its own
kernel choice, ``flash`` = flash-attn 2 package, ``_native_math`` = SDPA without fused kernels).

FLOPs of one transformer call, per batch element (matmuls only; norms, RoPE, softmax ignored):
    2 * P_linear * S                                 # every Linear of the 30 blocks + 6 VACE blocks,
                                                     # patch embedding and head, applied to S tokens
                                                     # (cross-attention K/V projections to L text tokens)
  + 4 * S * S * D * (30 + 6)                         # self-attention QK^T and AV
  + 4 * S * L * D * (30 + 6)                         # cross-attention QK^T and AV
with S = (latent frames + references) * (H / 16) * (W / 16), L = 512 text tokens, D = 1536.
A trained step counts 3x the forward (forward + backward) for the policy and 1x for the
reference; recomputation by gradient checkpointing is NOT counted (model FLOPs, not hardware
FLOPs). MFU = FLOPs / seconds / peak (989 TFLOP/s dense bf16 for H100 / H200 SXM, --peak-tflops).

    python benchmarks/gpu_full_size.py [--steps 25] [--batch 4] [--peak-tflops 989]
"""

from __future__ import annotations

import sys
import time

import common
import torch

WAN_VACE_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024, vace_layers=[0, 5, 10, 15, 20, 25], vace_in_channels=96,
)
HEIGHT, WIDTH, FRAMES, TEXT_TOKENS = 240, 416, 33, 512


def linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


def transformer_flops(transformer, tokens: int, batch: int) -> float:
    dim = WAN_VACE_1_3B["num_attention_heads"] * WAN_VACE_1_3B["attention_head_dim"]
    blocks = WAN_VACE_1_3B["num_layers"] + len(WAN_VACE_1_3B["vace_layers"])
    text_projection = 2 * dim * dim * blocks  # cross-attention K and V act on the text tokens, not on S
    per_element = (2 * (linear_params(transformer) - text_projection) * tokens + 2 * text_projection * TEXT_TOKENS
                   + 4 * tokens * tokens * dim * blocks + 4 * tokens * TEXT_TOKENS * dim * blocks)
    return per_element * batch


def reward_model(device):
    """A Qwen2.5-VL-3B-shaped reward model (random) with the tiny tokenizer and the released
    model's pixel limits (5 frames, at most 399,360 pixels a frame)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from vace_reward.inference import IdentityRewardScorer
    from vace_reward.model import IdentityRewardModel, RewardModelConfig
    from vace_reward.testing import build_tokenizer

    tokenizer = build_tokenizer()
    pixels = dict(min_pixels=128 * 28 * 28, max_pixels=399_360)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer)
    token = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128_000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
                         pad_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>")),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.device(device):
        backbone = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model_config = RewardModelConfig(dimensions=["SA"], num_frames=5, min_frame_pixels=pixels["min_pixels"],
                                     max_frame_pixels=pixels["max_pixels"], min_image_pixels=pixels["min_pixels"],
                                     max_image_pixels=pixels["max_pixels"])
    model = IdentityRewardModel(backbone, model_config,
                                reward_token_ids=tokenizer.convert_tokens_to_ids(model_config.reward_tokens))
    return IdentityRewardScorer(model.to(device, torch.bfloat16).eval(), processor, batch_size=4)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--backends", default="native,flash,_native_math")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_full_size.py needs a CUDA GPU (full-size Wan2.1-VACE-1.3B in bf16); none is visible here. "
                 "Run the CPU benchmarks instead (benchmarks/README.md).")
    common.setup(args)
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    from identity_grpo.models import add_lora
    from identity_grpo.pipelines.vace import SDEConfig, VaceRolloutPipeline
    from identity_grpo.testing import build_scheduler, build_text_encoder, build_tokenizer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.device(device):
        transformer = WanVACETransformer3DModel(**WAN_VACE_1_3B).to(torch.bfloat16).eval().requires_grad_(False)
        vae = AutoencoderKLWan().eval().requires_grad_(False)  # the default config is Wan2.1's VAE
    tokenizer = build_tokenizer()
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer)).to(device), vae=vae,
                           transformer=transformer, scheduler=build_scheduler())
    pipeline = VaceRolloutPipeline(pipe, dtype=torch.bfloat16)
    # UMT5-XXL is not built: random text embeddings of its shape stand in (text encoding is ~1 call per batch).
    prompt_embeds = torch.randn(args.batch, TEXT_TOKENS, 4096, device=device, dtype=torch.bfloat16)
    pipeline._negative_cache[("", TEXT_TOKENS)] = torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=torch.bfloat16)
    refs = [common.reference_images(1) for _ in range(args.batch)]
    prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(args.batch)]
    tokens = ((FRAMES - 1) // 4 + 2) * (HEIGHT // 16) * (WIDTH // 16)
    config = common.preset("vace")
    peft_model = add_lora(transformer, config)
    peft_model.enable_gradient_checkpointing()
    pipeline.transformer = peft_model
    scorer = reward_model(device)
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e9:.3f} B parameters, "
          f"{linear_params(transformer) / 1e9:.3f} B in Linear/Conv3d; {tokens} tokens per element")
    rows = []
    for backend in args.backends.split(","):
        try:
            transformer.set_attention_backend(backend)
            transformer(hidden_states=torch.zeros(1, 16, 2, 16, 16, device=device, dtype=torch.bfloat16),
                        timestep=torch.zeros(1, device=device), encoder_hidden_states=prompt_embeds[:1],
                        control_hidden_states=torch.zeros(1, 96, 2, 16, 16, device=device, dtype=torch.bfloat16),
                        return_dict=False)
        except Exception as error:  # backend not installed / not supported here
            print(f"backend {backend}: unavailable ({type(error).__name__}: {str(error)[:120]})")
            continue
        torch.cuda.reset_peak_memory_stats()

        def rollout():
            return pipeline(prompts, refs, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=args.steps,
                            guidance_scale=4.5, max_sequence_length=TEXT_TOKENS, prompt_embeds=prompt_embeds,
                            generator=torch.Generator().manual_seed(0), sde=SDEConfig())

        rollout()  # warm-up
        rollout_seconds, (rollouts, frames) = timed(rollout)
        rollout_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

        def train_step(step=0):
            peft_model.train()
            with torch.autocast("cuda", torch.bfloat16):
                out = pipeline.rescore(rollouts, step, guidance_scale=4.5, sde=SDEConfig(), transformer=peft_model)
                with torch.no_grad(), peft_model.disable_adapter():
                    reference = pipeline.rescore(rollouts, step, guidance_scale=4.5, sde=SDEConfig(),
                                                 transformer=peft_model)
            loss = out.log_prob.mean() + (out.prev_sample_mean - reference.prev_sample_mean).pow(2).mean()
            loss.backward()
            peft_model.zero_grad(set_to_none=True)

        train_step()
        step_seconds = min(timed(lambda: train_step(i % rollouts.num_steps))[0] for i in range(3))
        train_peak = torch.cuda.max_memory_allocated() / 2**30
        scorer.score_frames(frames, refs, prompts)
        reward_seconds, _ = timed(lambda: scorer.score_frames(frames, refs, prompts))
        call_flops = transformer_flops(transformer, tokens, 2 * args.batch)  # stacked CFG: 2B elements a call
        rollout_mfu = call_flops * args.steps / rollout_seconds / (args.peak_tflops * 1e12)
        train_mfu = call_flops * (3 + 1) / step_seconds / (args.peak_tflops * 1e12)
        rows.append([backend, f"{rollout_seconds / args.batch:.2f}", f"{step_seconds:.2f}",
                     f"{reward_seconds / args.batch:.3f}", f"{rollout_mfu:.1%}", f"{train_mfu:.1%}",
                     f"{rollout_peak:.1f}", f"{train_peak:.1f}"])
        print(f"  {backend}: done", flush=True)
    print(f"\n{torch.cuda.get_device_name()}: {HEIGHT}x{WIDTH}x{FRAMES}, {args.steps} steps, batch {args.batch}, "
          f"CFG 4.5 stacked; transformer FLOPs per call {transformer_flops(transformer, tokens, 2 * args.batch) / 1e12:.1f} T")
    print(common.table(["attention", "s / rollout video", "s / trained step (batch)", "s / reward video",
                        "rollout MFU", "train MFU", "rollout peak GiB", "train peak GiB"], rows))


if __name__ == "__main__":
    main()
