"""A tiny, randomly initialised identity reward model built offline with the real classes.

Everything is built from configs and a tokenizer trained on the spot (no model hub), written
in the standard reward-model layout (see :mod:`vace_reward.model`) and loaded back through the
same ``from_pretrained`` code a real checkpoint uses. Sizes are chosen so one scoring call of
four 5-frame 32x32 videos takes a fraction of a second on a CPU.

Command line: ``python -m vace_reward.testing OUT_DIR`` writes the tiny reward model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vace_reward.prompts import REWARD_TOKEN

# The Qwen2 chat/vision special tokens the processor and model rely on, then the reward token.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Text the tiny byte-level BPE is trained on: enough merges for the instruction to tokenize into
# a few dozen tokens instead of hundreds of single bytes.
_TOKENIZER_CORPUS = [
    "You are a helpful assistant.",
    "Picture 1: Picture 2: Picture 3: Picture 4: Video 1:",
    "Your task is to evaluate the quality of the video generated based on the all above reference images "
    "in the Subject alignment criteria. Please provide the rating of subject alignment:",
    "Evaluate the degree of similarity between the human face in the generated video and the human face.",
    "a man and a woman with short dark hair walk in the park and talk together",
]
TINY_VOCAB_SIZE = 320
# Pixel limits of the tiny model: every image and frame becomes 56x56 (2x2 merged tokens per
# frame pair), whatever its input size.
TINY_PIXELS = 56 * 56


def build_tokenizer(reward_tokens: tuple[str, ...] = (REWARD_TOKEN,)):
    """A byte-level BPE trained offline, wrapped as ``Qwen2TokenizerFast`` with the Qwen specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=QWEN_SPECIAL_TOKENS + list(reward_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tokenizer, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIAL_TOKENS[1:] + list(reward_tokens),
    )


def build_processor(reward_tokens: tuple[str, ...] = (REWARD_TOKEN,), min_pixels: int = TINY_PIXELS,
                    max_pixels: int = TINY_PIXELS):
    """``Qwen2_5_VLProcessor`` with the tiny tokenizer and the real image and video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixel_limits = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixel_limits),
        video_processor=Qwen2VLVideoProcessor(**pixel_limits),
        tokenizer=build_tokenizer(reward_tokens),
    )
    # Loading rebuilds the tokenizer from vocab + merges with Qwen2's own pre-tokenizer, which
    # splits text differently from the one trained above. Return the loaded form, so a model
    # scores the same before and after a save/load round trip.
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        return Qwen2_5_VLProcessor.from_pretrained(folder, local_files_only=True)


def build_backbone(tokenizer, seed: int = 0, text_sizes: dict | None = None, vision_sizes: dict | None = None):
    """A random ``Qwen2_5_VLForConditionalGeneration``: 2 layers of hidden 32 with a 1-block vision
    tower, unless ``text_sizes`` / ``vision_sizes`` override fields of the text / vision config
    (``benchmarks/gpu_full_size.py`` builds a Qwen2.5-VL-3B shape this way)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ) | (text_sizes or {}),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=32,
            fullatt_block_indexes=[0], tokens_per_second=2,
        ) | (vision_sizes or {}),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_reward_model(seed: int = 0, output_dim: int = 1, *, num_frames: int = 4,
                            min_pixels: int = TINY_PIXELS, max_pixels: int = TINY_PIXELS,
                            text_sizes: dict | None = None, vision_sizes: dict | None = None):
    """``(model, processor)``: a random :class:`~vace_reward.model.IdentityRewardModel`, tiny unless
    the pixel limits and :func:`build_backbone`'s size overrides say otherwise."""
    from vace_reward.model import IdentityRewardModel, RewardModelConfig

    processor = build_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    backbone = build_backbone(processor.tokenizer, seed=seed, text_sizes=text_sizes, vision_sizes=vision_sizes)
    config = RewardModelConfig(
        dimensions=["SA"] if output_dim == 1 else [f"dim{index}" for index in range(output_dim)],
        num_frames=num_frames, min_frame_pixels=min_pixels, max_frame_pixels=max_pixels,
        min_image_pixels=min_pixels, max_image_pixels=max_pixels,
    )
    torch.manual_seed(seed + 1)
    model = IdentityRewardModel(backbone, config, reward_token_ids=processor.tokenizer.convert_tokens_to_ids(config.reward_tokens))
    # A random head with std 1 / sqrt(hidden) gives scores of order 1, so differences between
    # inputs are visible in tests instead of vanishing in the 0.02-std default init.
    torch.nn.init.normal_(model.reward_head.weight, std=backbone.config.text_config.hidden_size ** -0.5)
    return model.eval(), processor


def write_tiny_reward_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random reward model to ``path`` in the standard layout; return the path.

    Atomic and idempotent: the model is written to a temporary folder next to ``path`` and
    renamed into place, so a reader never sees a half-written folder; if ``path`` already holds
    a reward model, nothing is written. Safe to call from several processes at once.
    """
    from vace_reward.model import REWARD_CONFIG_NAME

    path = Path(path)
    if (path / REWARD_CONFIG_NAME).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_reward_model(seed=seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp creates it private
    try:
        model.save_pretrained(staging, processor=processor)
        try:
            os.rename(staging, path)
        except OSError:
            # Another process finished first (the target now exists and is not empty): keep theirs.
            if not (path / REWARD_CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny reward model to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_reward_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
