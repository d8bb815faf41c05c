"""The real architectures at their real sizes, on the CPU, so that a wrong full-size configuration
fails here and not on a GPU node: Wan2.1-VACE-1.3B (30 blocks, 15 VACE blocks, bf16) makes one
rollout and one re-scored trained step with LoRA and the KL reference; the identity reward model
(the project's class on a Qwen2.5-VL-3B backbone) scores the videos. Random weights, the
smallest legal video (16x16, 5 frames).

The sizes are those ``benchmarks/gpu_full_size.py`` times on GPUs (the published configs: Wan's in
diffusers' conversion script, Qwen2.5-VL-3B-Instruct's config.json). Weights are created on the
meta device and filled by tiling one random block: initialising 1.3B values with ``normal_``
alone takes minutes on two cores.

The reward call keeps 1 of Qwen's 36 text layers (every width, and the full 32-block vision tower,
are real): this CPU multiplies bf16 at ~6 GFLOP/s and the reward instruction is ~800 tokens, so
each text layer costs ~20 s. The full-depth 3.75B model is built on the meta device and counted.
"""

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_full_size as full  # the full-size configs and the GPU benchmark's model builders

HEIGHT, WIDTH, FRAMES = 16, 16, 5  # height and width divisible by 16, frames 4k + 1
TEXT_TOKENS = 4  # prompt embeddings of UMT5-XXL's width (4096); their length does not matter here


def fill_meta_parameters(model, dtype_of) -> None:
    """Give every meta parameter of ``model`` cheap pseudo-random values: a fixed random block,
    tiled, times 1 / sqrt(fan_in) for matrices; biases 0, other vectors (norm weights) 1. Tied
    parameters stay tied. ``dtype_of(name)`` gives each parameter's dtype."""
    block = torch.randn(1_048_573, generator=torch.Generator().manual_seed(0))  # prime length: rows do not repeat
    filled: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.is_meta:
                continue
            if id(parameter) not in filled:
                value = torch.empty(parameter.shape, dtype=dtype_of(f"{module_name}.{name}"))
                if parameter.ndim >= 2:
                    flat = value.view(-1)
                    for start in range(0, flat.numel(), block.numel()):
                        chunk = flat[start:start + block.numel()]
                        chunk.copy_(block[:chunk.numel()])
                    value.mul_(parameter.shape[1:].numel() ** -0.5)
                else:
                    value.fill_(0.0 if name == "bias" else 1.0)
                filled[id(parameter)] = torch.nn.Parameter(value, requires_grad=parameter.requires_grad)
            module._parameters[name] = filled[id(parameter)]


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def real_size_vace_pipeline():
    """``VaceRolloutPipeline`` around a random bf16 Wan2.1-VACE-1.3B transformer and Wan2.1's VAE
    (fp32, as loaded); prompts come as random UMT5-XXL-shaped embeddings."""
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    from identity_grpo.pipelines.vace import VaceRolloutPipeline
    from identity_grpo.testing import build_scheduler, build_text_encoder, build_tokenizer

    with init_empty_weights(include_buffers=False):  # RoPE tables are buffers: computed for real
        transformer = WanVACETransformer3DModel(**full.WAN_VACE_1_3B)
    fill_meta_parameters(transformer, lambda name: torch.bfloat16)
    transformer = full.cast_as_loaded(transformer, torch.bfloat16).eval().requires_grad_(False)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval().requires_grad_(False)  # its default config is Wan2.1's VAE
    tokenizer = build_tokenizer()
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer)), vae=vae,
                           transformer=transformer, scheduler=build_scheduler())
    return VaceRolloutPipeline(pipe, dtype=torch.bfloat16)


@pytest.mark.slow
def test_real_size_rollout_trained_step_and_reward():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from identity_grpo.configuration import validate_config
    from identity_grpo.models import add_lora
    from identity_grpo.pipelines.vace import SDEConfig
    from vace_reward.inference import IdentityRewardScorer
    from vace_reward.testing import build_backbone, build_processor, build_tiny_reward_model

    config = load_module("dgx_presets_real_sizes", ROOT / "config" / "dgx.py").get_config("vace")
    config.height, config.width, config.frames = HEIGHT, WIDTH, FRAMES
    config.eval_height, config.eval_width, config.eval_frames = HEIGHT, WIDTH, FRAMES
    config.sample.num_steps = 2
    config.sample.train_batch_size = config.sample.num_image_per_prompt = 2
    config.train.gradient_accumulation_steps = 1
    validate_config(config, 1)  # the size is a legal one
    script = load_module("train_wan2_1_vace", ROOT / "train_wan2_1_vace.py")
    batch = config.sample.train_batch_size

    # ------------------------------------------------ Wan2.1-VACE-1.3B: rollout, trained step
    pipeline = real_size_vace_pipeline()
    blocks, vace_blocks = len(pipeline.transformer.blocks), len(pipeline.transformer.vace_blocks)
    assert (blocks, vace_blocks) == (30, 15)
    peft_model = add_lora(pipeline.transformer, config)
    peft_model.enable_gradient_checkpointing()
    pipeline.transformer = peft_model
    lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    # r32 A and B on to_q/k/v/out of both attentions of every block and VACE block.
    assert len(lora) == (blocks + vace_blocks) * 2 * 4 * 2
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(batch, TEXT_TOKENS, 4096, generator=generator).to(torch.bfloat16)
    pipeline._negative_cache[("", TEXT_TOKENS)] = torch.randn(1, TEXT_TOKENS, 4096, generator=generator).to(torch.bfloat16)
    references = [full.common.reference_images(1) for _ in range(batch)]
    prompts = [full.common.PROMPTS[i % len(full.common.PROMPTS)] for i in range(batch)]
    rollouts, frames = pipeline(prompts, references, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                                num_inference_steps=config.sample.num_steps, guidance_scale=config.sample.guidance_scale,
                                max_sequence_length=TEXT_TOKENS, prompt_embeds=prompt_embeds,
                                generator=torch.Generator().manual_seed(1), sde=SDEConfig())
    assert frames.shape == (batch, FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == torch.uint8
    assert torch.isfinite(rollouts.log_probs).all()

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # the train script's autocast and unwrap_model
    peft_model.train()
    try:
        with accelerator.autocast():  # one of the two videos: the trained step's cost is per video
            loss, stats = script.step_loss(config, accelerator, pipeline, peft_model,
                                           rollouts.select(torch.tensor([0])), torch.tensor([1.0]), 0)
    finally:
        AcceleratorState._reset_state(True)  # bf16 state would refuse every later in-process Accelerator
    loss.backward()
    assert torch.isfinite(loss)
    # lora_B starts at 0: the policy is the frozen base, so re-scoring gives ratio 1 and KL 0.
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-2)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    grads = [p.grad for name, p in lora.items() if "lora_B" in name]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    del pipeline, peft_model, lora, grads, rollouts, loss
    gc.collect()

    # ------------------------------------------------ the reward model on Qwen2.5-VL-3B
    pixels = 56 * 56  # 4 merged tokens a frame (28 x 28, the size one token covers, is refused)
    with init_empty_weights():
        full_depth = build_backbone(build_processor(min_pixels=pixels, max_pixels=pixels).tokenizer,
                                    text_sizes=full.QWEN2_5_VL_3B_TEXT, vision_sizes=full.QWEN2_5_VL_3B_VISION)
    full_depth.tie_weights()  # as from_pretrained leaves it: lm_head shares the token embeddings
    assert sum(p.numel() for p in full_depth.parameters()) / 1e9 == pytest.approx(3.75, abs=0.01)
    del full_depth
    with init_empty_weights(include_buffers=False):
        model, processor = build_tiny_reward_model(
            num_frames=5, text_sizes=full.QWEN2_5_VL_3B_TEXT | {"num_hidden_layers": 1},
            vision_sizes=full.QWEN2_5_VL_3B_VISION, min_pixels=pixels, max_pixels=pixels)
    model.backbone.tie_weights()
    # As IdentityRewardModel.from_pretrained loads it: the backbone in bf16, the reward head in fp32.
    fill_meta_parameters(model, lambda name: torch.float32 if name.startswith("reward_head") else torch.bfloat16)
    scorer = IdentityRewardScorer(model.eval(), processor, batch_size=batch)
    with torch.no_grad():
        scores = scorer.score_frames(frames, references, prompts)
    assert scores.shape == (batch, 1) and torch.isfinite(scores).all()
