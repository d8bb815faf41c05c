"""The identity reward model: Qwen2.5-VL with a linear head read at a reward token.

The model sees 1-4 reference images, one video and an instruction that contains a reward token
(``<|SA_reward|>``, added to the tokenizer). The head maps the last hidden state at that token
to ``output_dim`` scores (1: subject alignment). With one reward token per dimension, dimension
``i`` is read at token ``i``; with a single token, every dimension is read there.

Standard layout of a saved model (``IdentityRewardModel.save_pretrained``)::

    DIR/config.json, model.safetensors      Qwen2_5_VLForConditionalGeneration.save_pretrained
    DIR/tokenizer*, *processor*config.json   Qwen2_5_VLProcessor.save_pretrained (with reward token)
    DIR/reward_head.safetensors              {"weight": (output_dim, hidden)}, float32
    DIR/reward_config.json                   RewardModelConfig (instruction text, frames, pixels)

The upstream release layout (``model_config.json`` + ``checkpoint-N/adapter_model.safetensors``
+ ``checkpoint-N/non_lora_state_dict.pth`` on top of a base Qwen2.5-VL) is also read by
:meth:`IdentityRewardModel.from_pretrained`; the LoRA is merged into the base weights on load.
``python -m vace_reward.model convert UPSTREAM_DIR OUT_DIR`` rewrites it in the standard layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vace_reward.prompts import DEFAULT_SYSTEM_PROMPT, REWARD_TOKEN, SUBJECT_ALIGNMENT_INSTRUCTION

logger = logging.getLogger(__name__)

REWARD_CONFIG_NAME = "reward_config.json"
REWARD_HEAD_NAME = "reward_head.safetensors"
UPSTREAM_CONFIG_NAME = "model_config.json"
FORMAT_VERSION = 1


@dataclass
class RewardModelConfig:
    """What a reward model needs besides its weights; saved as ``reward_config.json``.

    Attributes:
        dimensions: names of the output scores; ``output_dim == len(dimensions)``.
        reward_tokens: the token(s) the head reads, each added to the tokenizer as a special token.
            One token: all dimensions are read there. ``len(dimensions)`` tokens: one each.
        instruction: the instruction text; must contain every reward token exactly once.
        system_prompt: text of the system turn.
        num_frames: frames sampled uniformly from each video (qwen-vl-utils rounds it to an even
            number: 5 -> 4).
        min_frame_pixels / max_frame_pixels: pixel-count bounds of each video frame after resizing
            (aspect kept, sides multiples of 28).
        min_image_pixels / max_image_pixels: the same for each reference image.
        max_references: most reference images per sample.
        fps: frame rate assumed for in-memory frames (sets the temporal position spacing of the
            video tokens; a file's own frame rate is used for video files). 10: upstream scores
            rollouts written by diffusers' ``export_to_video``, whose default is 10 fps.
    """

    dimensions: list[str] = field(default_factory=lambda: ["SA"])
    reward_tokens: list[str] = field(default_factory=lambda: [REWARD_TOKEN])
    instruction: str = SUBJECT_ALIGNMENT_INSTRUCTION
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    num_frames: int = 5
    min_frame_pixels: int = 128 * 28 * 28
    max_frame_pixels: int = 399_360
    min_image_pixels: int = 4 * 28 * 28
    max_image_pixels: int = 399_360
    max_references: int = 4
    fps: float = 10.0

    def __post_init__(self):
        if len(self.reward_tokens) not in (1, len(self.dimensions)):
            raise ValueError(
                f"reward_tokens must hold 1 token or one per dimension ({len(self.dimensions)}), got {self.reward_tokens}"
            )
        for token in self.reward_tokens:
            if self.instruction.count(token) != 1:
                raise ValueError(f"the instruction must contain reward token {token!r} exactly once")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (Qwen2.5-VL pairs frames in time), got {self.num_frames}")
        for kind in ("frame", "image"):
            low, high = getattr(self, f"min_{kind}_pixels"), getattr(self, f"max_{kind}_pixels")
            if not 0 < low <= high:
                raise ValueError(f"need 0 < min_{kind}_pixels <= max_{kind}_pixels, got {low} and {high}")
        if not 1 <= self.max_references <= 4:
            raise ValueError(f"max_references must be in [1, 4], got {self.max_references}")

    @property
    def output_dim(self) -> int:
        return len(self.dimensions)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> RewardModelConfig:
        values = dict(values)
        version = values.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"reward config format {version} is newer than this code ({FORMAT_VERSION}); update vace_reward")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown reward config fields {sorted(unknown)}")
        return cls(**values)


def default_attn_implementation(device: torch.device | str) -> str:
    """flash-attention 2 on CUDA when the package is importable, PyTorch SDPA otherwise."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class IdentityRewardModel(nn.Module):
    """Qwen2.5-VL backbone + linear reward head at the reward token(s).

    Args:
        backbone: a ``Qwen2_5_VLForConditionalGeneration`` whose embeddings include the reward
            token(s). Only its ``.model`` (vision tower + language model) runs; ``lm_head`` is kept
            so the folder stays a loadable Qwen2.5-VL checkpoint.
        config: the reward config.
        reward_token_ids: tokenizer ids of ``config.reward_tokens``, in order.
    """

    def __init__(self, backbone: nn.Module, config: RewardModelConfig, reward_token_ids: list[int]):
        super().__init__()
        if len(reward_token_ids) != len(config.reward_tokens):
            raise ValueError(f"expected {len(config.reward_tokens)} reward token ids, got {reward_token_ids}")
        self.backbone = backbone
        self.config = config
        self.register_buffer("reward_token_ids", torch.tensor(reward_token_ids, dtype=torch.long), persistent=False)
        hidden_size = backbone.config.text_config.hidden_size
        # No bias: a constant offset cancels in every pairwise loss. Kept in float32 whatever the
        # backbone dtype, so scores do not carry bf16 rounding.
        self.reward_head = nn.Linear(hidden_size, config.output_dim, bias=False, dtype=torch.float32)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **unused,
    ) -> torch.Tensor:
        """Scores of a processed batch.

        Args:
            input_ids, attention_mask: ``(B, L)`` from the processor.
            pixel_values, image_grid_thw: patches of all reference images of the batch.
            pixel_values_videos, video_grid_thw, second_per_grid_ts: patches and timing of the videos.
            mm_token_type_ids: ``(B, L)`` text/image/video token types; needed for 3-D positions.

        Returns:
            ``(B, output_dim)`` float32 scores.
        """
        outputs = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        )
        hidden_states = outputs.last_hidden_state  # (B, L, D)
        is_reward_token = torch.isin(input_ids, self.reward_token_ids)
        counts = is_reward_token.sum(dim=1)
        num_tokens = self.reward_token_ids.numel()
        if bool((counts != num_tokens).any()):
            raise ValueError(
                f"every sample must hold each reward token once ({num_tokens} in all), got counts {counts.tolist()}; "
                "was the text built with vace_reward.prompts.build_reward_text and the model's instruction?"
            )
        batch_size = input_ids.shape[0]
        # Boolean indexing keeps sequence order, so row b holds token 0..T-1 of sample b.
        pooled = hidden_states[is_reward_token].view(batch_size, num_tokens, -1).float()  # (B, T, D)
        logits = self.reward_head(pooled)  # (B, T, N)
        if num_tokens == 1:
            return logits[:, 0]
        return logits.diagonal(dim1=1, dim2=2)  # dimension i read at token i

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, path: str | os.PathLike, processor=None, backbone_state_dict: dict | None = None) -> None:
        """Write the standard layout to ``path`` (see the module docstring).

        ``processor`` (with the reward token in its tokenizer) is saved alongside when given; a
        folder without it cannot be loaded for scoring. ``backbone_state_dict`` replaces the
        backbone's own weights (training passes the LoRA-merged weights).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, state_dict=backbone_state_dict)
        if processor is not None:
            processor.save_pretrained(path)
        save_file({"weight": self.reward_head.weight.detach().float().cpu().contiguous()}, str(path / REWARD_HEAD_NAME))
        (path / REWARD_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        base_model: str | None = None,
        checkpoint_step: int | None = None,
    ) -> tuple[IdentityRewardModel, object]:
        """Load ``(model, processor)`` from the standard layout or the upstream release layout.

        Args:
            path: the reward model folder.
            device: where to put the model.
            dtype: backbone dtype; default bfloat16 on CUDA, float32 on CPU.
            attn_implementation: default :func:`default_attn_implementation`.
            base_model: upstream layout only: the base Qwen2.5-VL folder or hub id; default the
                ``model_name_or_path`` recorded in ``model_config.json``.
            checkpoint_step: upstream layout only: which ``checkpoint-N``; default the latest.

        Returns:
            The model in eval mode and its ``Qwen2_5_VLProcessor``.
        """
        path = Path(path)
        dtype = dtype or default_dtype(device)
        attn_implementation = attn_implementation or default_attn_implementation(device)
        if (path / REWARD_CONFIG_NAME).is_file():
            model, processor = _load_standard(path, dtype, attn_implementation)
        elif (path / UPSTREAM_CONFIG_NAME).is_file():
            model, processor = _load_upstream(path, dtype, attn_implementation, base_model, checkpoint_step)
        elif not path.exists():
            raise FileNotFoundError(f"reward model folder {path} does not exist")
        else:
            raise FileNotFoundError(
                f"{path} is not a reward model folder: expected {REWARD_CONFIG_NAME} (standard layout) or "
                f"{UPSTREAM_CONFIG_NAME} + checkpoint-N/ (upstream release layout)"
            )
        return model.to(device).eval(), processor


def new_reward_model(base_model: str | os.PathLike, config: RewardModelConfig | None = None,
                     dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0):
    """``(model, processor)``: a plain Qwen2.5-VL (folder or hub id) turned into a reward model.

    Adds the reward token(s) to the tokenizer, resizes the embeddings (the new rows start at the
    mean of the old ones) and creates a fresh head (std ``0.1 / sqrt(hidden)``, so the first
    scores are small and training starts near "no preference").
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    config = config or RewardModelConfig()
    processor = AutoProcessor.from_pretrained(base_model)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(config.reward_tokens)})
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        base_model, dtype=dtype, attn_implementation=attn_implementation
    )
    torch.manual_seed(seed)
    backbone.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    embeddings = backbone.get_input_embeddings().weight
    num_new = len(config.reward_tokens)
    with torch.no_grad():
        embeddings[-num_new:] = embeddings[:-num_new].mean(dim=0, keepdim=True)
    model = IdentityRewardModel(backbone, config, _reward_token_ids(processor.tokenizer, config, Path(str(base_model))))
    nn.init.normal_(model.reward_head.weight, std=0.1 * backbone.config.text_config.hidden_size ** -0.5)
    return model, processor


def _reward_token_ids(tokenizer, config: RewardModelConfig, source: Path) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(config.reward_tokens)
    unknown = [token for token, index in zip(config.reward_tokens, ids) if index is None or index == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"{source}: reward token(s) {unknown} are not in the tokenizer; the folder is incomplete")
    return ids


def _load_standard(path: Path, dtype: torch.dtype, attn_implementation: str):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    config = RewardModelConfig.from_dict(json.loads((path / REWARD_CONFIG_NAME).read_text()))
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model = IdentityRewardModel(backbone, config, _reward_token_ids(processor.tokenizer, config, path))
    head = load_file(str(path / REWARD_HEAD_NAME))["weight"]
    if head.shape != model.reward_head.weight.shape:
        raise ValueError(f"{path / REWARD_HEAD_NAME}: head shape {tuple(head.shape)} != {tuple(model.reward_head.weight.shape)}")
    model.reward_head.weight.data.copy_(head)
    return model, processor


# --------------------------------------------------------------------- upstream release layout

# Old (transformers < 4.52) Qwen2.5-VL parameter names -> current names.
_UPSTREAM_KEY_RENAMES = [
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
    (re.compile(r"^visual\."), "model.visual."),
]


def _normalise_upstream_key(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    for pattern, replacement in _UPSTREAM_KEY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _latest_checkpoint(path: Path, step: int | None) -> Path:
    checkpoints = {int(p.name.split("-")[-1]): p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if not checkpoints:
        raise FileNotFoundError(f"{path}: upstream layout without any checkpoint-N folder")
    if step is None:
        return checkpoints[max(checkpoints)]
    if step not in checkpoints:
        raise FileNotFoundError(f"{path}: no checkpoint-{step}; available steps {sorted(checkpoints)}")
    return checkpoints[step]


def _load_upstream(path: Path, dtype, attn_implementation, base_model: str | None, checkpoint_step: int | None):
    """Rebuild the upstream model: base Qwen2.5-VL + reward token + merged LoRA + non-LoRA weights."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    upstream = json.loads((path / UPSTREAM_CONFIG_NAME).read_text())
    model_config, data_config = upstream["model_config"], upstream["data_config"]
    lora_config = upstream.get("peft_lora_config", {})
    if model_config.get("reward_token") != "special" or not model_config.get("use_special_tokens"):
        raise ValueError(f"{path / UPSTREAM_CONFIG_NAME}: only reward_token='special' checkpoints are supported")
    template = data_config.get("prompt_template_type")
    if template != "subject_alignment_special":
        raise ValueError(f"{path / UPSTREAM_CONFIG_NAME}: prompt_template_type {template!r} is not supported "
                         "(only 'subject_alignment_special')")
    if data_config.get("fps") is not None:
        logger.warning("%s: trained with fps sampling; scoring uses num_frames=%s instead", path, data_config.get("num_frames"))
    dimensions = list(data_config.get("eval_dim") or ["SA"])
    max_pixels = int(data_config["max_frame_pixels"])
    defaults = RewardModelConfig()
    config = RewardModelConfig(
        dimensions=dimensions,
        reward_tokens=[REWARD_TOKEN],
        num_frames=int(data_config.get("num_frames") or 5),
        # Upstream used qwen-vl-utils' default lower bounds, and one upper bound for both.
        min_frame_pixels=min(defaults.min_frame_pixels, max_pixels),
        max_frame_pixels=max_pixels,
        min_image_pixels=min(defaults.min_image_pixels, max_pixels),
        max_image_pixels=max_pixels,
    )
    base_model = base_model or model_config["model_name_or_path"]
    checkpoint = _latest_checkpoint(path, checkpoint_step)
    logger.info("loading upstream reward checkpoint %s on base %s", checkpoint, base_model)

    processor = AutoProcessor.from_pretrained(base_model)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        base_model, dtype=torch.float32, attn_implementation=attn_implementation
    )
    # Upstream resized the embeddings to len(tokenizer) (this can shrink a padded vocabulary).
    backbone.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)

    state = {_normalise_upstream_key(k): v for k, v in torch.load(checkpoint / "non_lora_state_dict.pth",
                                                                  map_location="cpu", weights_only=True).items()}
    head = state.pop("rm_head.weight", None)
    if head is None:
        raise KeyError(f"{checkpoint / 'non_lora_state_dict.pth'} has no rm_head.weight")
    if not any("embed_tokens" in key for key in state):
        logger.warning("%s: no trained embeddings; the reward token embedding is not the trained one", checkpoint)
    lora = {_normalise_upstream_key(k): v for k, v in load_file(str(checkpoint / "adapter_model.safetensors")).items()}
    state.update(_merge_lora(backbone.state_dict(), lora, lora_config))
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"{checkpoint}: weights that match no parameter of {base_model}: {unexpected[:5]}")

    model = IdentityRewardModel(backbone.to(dtype), config, _reward_token_ids(processor.tokenizer, config, path))
    if head.shape != model.reward_head.weight.shape:
        raise ValueError(f"{checkpoint}: rm_head shape {tuple(head.shape)} != {tuple(model.reward_head.weight.shape)}")
    model.reward_head.weight.data.copy_(head.float())
    return model, processor


def _merge_lora(base_state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], lora_config: dict) -> dict:
    """Base weights with ``scale * B @ A`` added, for every LoRA pair in ``lora``.

    ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), as in peft. Computed in float32.
    """
    rank, alpha = lora_config.get("lora_r", 64), lora_config.get("lora_alpha", 128)
    scale = alpha / math.sqrt(rank) if lora_config.get("use_rslora") else alpha / rank
    merged = {}
    for key_a, lora_a in lora.items():
        if not key_a.endswith(".lora_A.weight"):
            continue
        prefix = key_a.removesuffix(".lora_A.weight")
        lora_b = lora.get(f"{prefix}.lora_B.weight")
        weight_key = f"{prefix}.weight"
        if lora_b is None or weight_key not in base_state:
            raise KeyError(f"LoRA pair {prefix}: missing lora_B or no base weight {weight_key}")
        base = base_state[weight_key]
        merged[weight_key] = (base.float() + scale * (lora_b.float() @ lora_a.float())).to(base.dtype)
    return merged


def atomic_save(model: IdentityRewardModel, processor, path: str | os.PathLike,
                backbone_state_dict: dict | None = None) -> Path:
    """``model.save_pretrained`` into a temporary sibling folder, then rename it to ``path``.

    An existing ``path`` is replaced only once the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp creates it private
    try:
        model.save_pretrained(staging, processor=processor, backbone_state_dict=backbone_state_dict)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Reward model utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="rewrite an upstream release checkpoint in the standard layout")
    convert.add_argument("upstream_dir")
    convert.add_argument("out_dir")
    convert.add_argument("--base-model", default=None, help="base Qwen2.5-VL folder (default: from model_config.json)")
    convert.add_argument("--step", type=int, default=None, help="checkpoint-N to convert (default: latest)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model, processor = IdentityRewardModel.from_pretrained(
        args.upstream_dir, dtype=torch.bfloat16, base_model=args.base_model, checkpoint_step=args.step
    )
    print(atomic_save(model, processor, args.out_dir))


if __name__ == "__main__":
    main()
