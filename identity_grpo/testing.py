"""Tiny, randomly initialised, seeded models built offline with the real classes.

They are written to disk in the diffusers/transformers format and loaded back through the same
``from_pretrained`` code used for ``Wan-AI/Wan2.1-VACE-1.3B-diffusers``, so tests and the quick
start exercise the real loading and conditioning paths at toy sizes.

Command line: ``python -m identity_grpo.testing OUT_DIR`` writes the tiny VACE pipeline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Constraints of the real architecture that the tiny one keeps: the VACE control input is
# [inactive latents, reactive latents, 8x8 pixel mask] = 2 * z_dim + 64 channels.
TINY_Z_DIM = 4
TINY_TEXT_DIM = 32
TINY_VOCAB = ["a", "man", "woman", "with", "short", "long", "hair", "dark", "light", "red", "blue",
              "green", "smiles", "walks", "talks", "in", "park", "room", "street", "two", "people",
              "person", "together", "the", "is", "are", "and", "at", "on", "skin", "brown", "blond"]


def build_tokenizer(vocabulary=TINY_VOCAB):
    """A UMT5-style Unigram tokenizer over a toy vocabulary, made offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    # Whole words with the metaspace prefix, plus single characters so any text tokenizes.
    pieces = [(token, 0.0) for token in specials]
    pieces += [("\u2581" + word, -1.0) for word in vocabulary]
    pieces += [(char, -5.0) for char in "\u2581abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def build_vae():
    from diffusers import AutoencoderKLWan

    generator = torch.Generator().manual_seed(1)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=TINY_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=torch.randn(TINY_Z_DIM, generator=generator).mul(0.1).tolist(),
        latents_std=torch.rand(TINY_Z_DIM, generator=generator).add(0.5).tolist(),
    ).eval()
    # A randomly initialised decoder's output is dominated by its conv biases: frames barely
    # depend on the latents (pixel std over latents ~0.02), so no reward could be learned.
    # Zero biases and slightly larger weights give a decoder that follows its input (std ~0.15).
    with torch.no_grad():
        for module in vae.decoder.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.mul_(2.0)
                if module.bias is not None:
                    module.bias.zero_()
    return vae


def build_vace_transformer():
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=TINY_Z_DIM,
        out_channels=TINY_Z_DIM, text_dim=TINY_TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
        vace_layers=[0, 1], vace_in_channels=2 * TINY_Z_DIM + 64,
    ).eval()


def build_t2v_transformer():
    """The Wan2.1 text-to-video transformer at toy size (Phantom's architecture)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=TINY_Z_DIM,
        out_channels=TINY_Z_DIM, text_dim=TINY_TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    ).eval()


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_wan_unipc_scheduler(flow_shift: float = 3.0):
    """The real Wan2.1 scheduler, built offline from its published config (shift 3: VACE-1.3B and
    T2V-1.3B; Phantom uses 5)."""
    from diffusers import UniPCMultistepScheduler

    from identity_grpo.schedules import WAN_UNIPC_SCHEDULER_CONFIG

    return UniPCMultistepScheduler(**{**WAN_UNIPC_SCHEDULER_CONFIG, "flow_shift": flow_shift})


def _tiny_components(seed: int, build_transformer) -> dict:
    """Tokenizer, text encoder, VAE, ``build_transformer()`` and scheduler, seeded in that order."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer)), vae=build_vae(),
                transformer=build_transformer(), scheduler=build_scheduler())


def build_tiny_vace_pipeline(seed: int = 0):
    """An in-memory ``WanVACEPipeline`` of tiny random components (fixed seed)."""
    from diffusers import WanVACEPipeline

    return WanVACEPipeline(**_tiny_components(seed, build_vace_transformer))


def randomize_lora_b(peft_model, std: float, seed: int) -> None:
    """Fill every ``lora_B`` with N(0, std) draws from one generator seeded ``seed``: a stand-in
    for a trained adapter (peft starts ``lora_B`` at zero, where the adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=std, generator=generator)


def write_tiny_vace(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``path`` (atomically: a temp folder renamed into place)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    return _write_atomically(path, lambda staging: build_tiny_vace_pipeline(seed).save_pretrained(staging))


def _write_atomically(path: Path, write) -> Path:
    """``write(staging)`` into a temp folder beside ``path``, then rename it into place, so a
    crash or a concurrent writer never leaves a half-written model that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    write(staging)
    try:
        os.rename(staging, path)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "model_index.json").is_file():
            raise
    return path


# ---------------------------------------------------------------------------------------- Phantom
# Phantom-Wan ships its DiT as an original-format Wan ``.pth``; the tiny Phantom checkpoint is a
# diffusers Wan2.1-T2V folder (tokenizer, UMT5, VAE, scheduler, a T2V transformer) plus such a
# ``.pth`` holding a DIFFERENT tiny transformer, so tests can tell which weights were loaded.
TINY_PHANTOM_DIT = "phantom_dit.pth"

# diffusers name -> original Wan name, applied in order (the inverse of diffusers'
# ``convert_wan_transformer_to_diffusers`` for the text-to-video architecture).
_DIFFUSERS_TO_ORIGINAL_WAN = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # Original blocks: norm1, norm2 (no affine), norm3 = the affine cross-attention norm, which
    # diffusers calls norm2.
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]


def to_original_wan_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``WanTransformer3DModel`` state dict under the original Wan key names
    (``blocks.0.self_attn.q.weight``, ``head.head.weight``, ...), as in a released ``.pth``."""
    import re

    converted = {}
    for key, value in state_dict.items():
        original = key
        for pattern, replacement in _DIFFUSERS_TO_ORIGINAL_WAN:
            original = re.sub(pattern, replacement, original)
        converted[original] = value.detach().clone()
    return converted


def build_tiny_phantom_dit(seed: int = 1):
    """The tiny Phantom DiT: the tiny T2V architecture with its own seeded weights."""
    torch.manual_seed(seed)
    return build_t2v_transformer()


def build_tiny_t2v_pipeline(seed: int = 0):
    """An in-memory ``WanPipeline`` of tiny random components (the Wan2.1-T2V base Phantom uses)."""
    from diffusers import WanPipeline

    return WanPipeline(**_tiny_components(seed, build_t2v_transformer))


def write_tiny_phantom(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Phantom checkpoint: a diffusers T2V folder at ``path`` and, inside it,
    ``phantom_dit.pth`` (original Wan keys, different weights from the folder's transformer).
    Atomic like :func:`write_tiny_vace`."""
    path = Path(path)
    if (path / "model_index.json").is_file() and (path / TINY_PHANTOM_DIT).is_file():
        return path

    def write(staging: Path) -> None:
        build_tiny_t2v_pipeline(seed).save_pretrained(staging)
        torch.save(to_original_wan_keys(build_tiny_phantom_dit(seed + 1).state_dict()), staging / TINY_PHANTOM_DIT)

    return _write_atomically(path, write)


# ---------------------------------------------------------------------------- OpenS2V Aesthetics
def write_tiny_aesthetics(folder: str | Path, score: float = 6.5, seed: int = 0) -> tuple[Path, Path]:
    """A tiny CLIP (a ``CLIPModel`` folder like openai/clip-vit-large-patch14's, 32 px images, 4-D
    embeddings, with its image processor) in ``folder/clip`` and a LAION-layout aesthetic head for
    it in ``folder/aesthetic_head.pth`` whose weights are zero and last bias ``score``: every image
    scores ``score``, so a test knows the number that must come out of the files.

    Returns:
        ``(clip_folder, head_file)``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from identity_grpo.rewards.composite import AestheticHead

    folder = Path(folder)
    clip_folder, head_file = folder / "clip", folder / "aesthetic_head.pth"
    torch.manual_seed(seed)
    tower = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=dict(tower, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(tower, image_size=32, patch_size=16), projection_dim=4)
    CLIPModel(config).save_pretrained(clip_folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_folder)
    head = AestheticHead(config.projection_dim)
    state = {key: torch.zeros_like(value) for key, value in head.state_dict().items()}
    state[f"layers.{len(head.layers) - 1}.bias"] = torch.tensor([score])
    torch.save(state, head_file)
    return clip_folder, head_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny diffusers VACE pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_vace(args.out_dir, args.seed))


if __name__ == "__main__":
    main()


def load_preset(name: str):
    """``config/dgx.py:NAME`` as ``--config`` loads it (the presets file is not a package module)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "config" / "dgx.py"
    spec = importlib.util.spec_from_file_location("identity_grpo_dgx_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)
