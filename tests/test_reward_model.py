"""The identity reward model: head at the reward token, save/load layouts, the GRPO registry entry."""

from __future__ import annotations

import json

import ml_collections
import pytest
import torch
from PIL import Image

import identity_grpo.rewards.identity  # noqa: F401  (registers "identity")
from identity_grpo.rewards import REGISTRY, RewardInputs, build_reward_fn
from vace_reward.inference import IdentityRewardScorer
from vace_reward.model import REWARD_CONFIG_NAME, IdentityRewardModel, RewardModelConfig
from vace_reward.prompts import SUBJECT_ALIGNMENT_INSTRUCTION, build_reward_text
from vace_reward.testing import build_backbone, build_processor, build_tiny_reward_model, write_tiny_reward_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_reward_model(tmp_path_factory.mktemp("reward") / "tiny")


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return IdentityRewardScorer.from_pretrained(tiny_dir)


def random_batch(batch_size=4, num_frames=5, size=32, seed=0):
    """uint8 frames, 1-3 references per sample (different sequence lengths), prompts."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch_size, num_frames, size, size, 3), dtype=torch.uint8, generator=generator)
    references = [
        [Image.fromarray(torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8, generator=generator).numpy())
         for _ in range(1 + index % 3)]
        for index in range(batch_size)
    ]
    return frames, references, [f"prompt {index}" for index in range(batch_size)]


def test_score_is_head_at_reward_token(scorer):
    frames, references, prompts = random_batch(batch_size=2)
    samples = [scorer.prepare(scorer.sample_frames(frames[i], 16.0, "t"), references[i], prompts[i]) for i in range(2)]
    batch = scorer.collate(samples)
    with torch.no_grad():
        scores = scorer.model(**batch)
        hidden = scorer.model.backbone.model(**batch, use_cache=False).last_hidden_state
    token_id = scorer.processor.tokenizer.convert_tokens_to_ids("<|SA_reward|>")
    for row in range(2):
        (position,) = (batch["input_ids"][row] == token_id).nonzero()[0].tolist()
        expected = hidden[row, position].float() @ scorer.model.reward_head.weight[0]
        torch.testing.assert_close(scores[row, 0], expected, atol=1e-6, rtol=1e-6)
    # The two samples differ in length, so the batch is padded and positions differ per row.
    assert batch["attention_mask"][1].sum() != batch["attention_mask"][0].sum()


def test_batched_scores_equal_one_at_a_time(scorer):
    frames, references, prompts = random_batch()
    batched = scorer.score_frames(frames, references, prompts)
    single = torch.cat([scorer.score_frames(frames[i:i + 1], references[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    assert batched.shape == (4, 1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    # Different inputs give different scores (the model is not constant).
    assert batched.std() > 1e-4


def test_one_token_per_dimension_reads_its_own_token():
    tokens = ("<|A_reward|>", "<|B_reward|>", "<|C_reward|>")
    processor = build_processor(reward_tokens=tokens)
    instruction = "Rate identity: <|A_reward|> hair: <|B_reward|> skin: <|C_reward|>"
    config = RewardModelConfig(dimensions=["A", "B", "C"], reward_tokens=list(tokens), instruction=instruction,
                               min_frame_pixels=3136, max_frame_pixels=3136, min_image_pixels=3136, max_image_pixels=3136)
    model = IdentityRewardModel(build_backbone(processor.tokenizer), config,
                                processor.tokenizer.convert_tokens_to_ids(list(tokens))).eval()
    scorer = IdentityRewardScorer(model, processor)
    frames, references, prompts = random_batch(batch_size=1)
    batch = scorer.collate([scorer.prepare(scorer.sample_frames(frames[0], 16.0, "t"), references[0], prompts[0])])
    with torch.no_grad():
        scores = model(**batch)
        hidden = model.backbone.model(**batch, use_cache=False).last_hidden_state[0]
    assert scores.shape == (1, 3)
    for dim, token in enumerate(tokens):
        position = (batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(token)).nonzero().item()
        torch.testing.assert_close(scores[0, dim], hidden[position] @ model.reward_head.weight[dim], atol=1e-6, rtol=1e-6)


def test_missing_reward_token_is_an_error(scorer):
    frames, references, prompts = random_batch(batch_size=1)
    sample = scorer.prepare(scorer.sample_frames(frames[0], 16.0, "t"), references[0], prompts[0])
    sample.text = sample.text.replace("<|SA_reward|>", "")
    with pytest.raises(ValueError, match="reward token"):
        scorer.model(**scorer.collate([sample]))


def test_config_rejects_instruction_without_token():
    with pytest.raises(ValueError, match="exactly once"):
        RewardModelConfig(instruction="Rate the video.")


def test_save_load_round_trip_is_exact(tmp_path):
    model, processor = build_tiny_reward_model(seed=3)
    model.save_pretrained(tmp_path / "m", processor=processor)
    loaded, loaded_processor = IdentityRewardModel.from_pretrained(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    saved = json.loads((tmp_path / "m" / REWARD_CONFIG_NAME).read_text())
    assert saved["instruction"] == SUBJECT_ALIGNMENT_INSTRUCTION
    assert loaded.config == model.config
    frames, references, prompts = random_batch(batch_size=2)
    before = IdentityRewardScorer(model, processor).score_frames(frames, references, prompts)
    after = IdentityRewardScorer(loaded, loaded_processor).score_frames(frames, references, prompts)
    assert torch.equal(before, after)


def test_write_tiny_reward_model_is_idempotent(tiny_dir):
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_reward_model(tiny_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tiny_dir.parent.iterdir() if ".tmp-" in p.name]


def test_prompt_layout_matches_qwen_chat_template():
    text = build_reward_text("Rate <|SA_reward|>", num_references=2)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Rate <|SA_reward|><|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------ upstream release layout

def _old_key(key: str) -> str:
    """Current Qwen2.5-VL parameter name -> the pre-4.52 name upstream checkpoints use, peft-prefixed."""
    key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    return f"base_model.model.{key}"


def test_upstream_layout_merges_lora_and_loads_head(tmp_path):
    from safetensors.torch import save_file

    # The base model as users have it: plain Qwen2.5-VL + processor without the reward token.
    base_processor = build_processor(reward_tokens=())
    base = build_backbone(base_processor.tokenizer, seed=5)
    base.save_pretrained(tmp_path / "base")
    base_processor.save_pretrained(tmp_path / "base")

    hidden = base.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    lora_a = torch.randn(4, hidden, generator=generator)
    lora_b = torch.randn(hidden, 4, generator=generator)
    head = torch.randn(1, hidden, generator=generator)
    merger = "model.visual.merger.mlp.0.weight"
    merger_weight = torch.randn_like(base.state_dict()[merger])

    upstream = tmp_path / "identity_reward"
    (upstream / "checkpoint-7").mkdir(parents=True)
    (upstream / "checkpoint-2").mkdir()
    (upstream / "model_config.json").write_text(json.dumps({
        "data_config": {"max_frame_pixels": 3136, "num_frames": 5.0, "fps": None, "eval_dim": ["SA"],
                        "prompt_template_type": "subject_alignment_special"},
        "model_config": {"model_name_or_path": str(tmp_path / "base"), "output_dim": 1, "use_special_tokens": True,
                         "reward_token": "special", "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
    }))
    save_file({_old_key(f"{q_proj}.lora_A.weight"): lora_a, _old_key(f"{q_proj}.lora_B.weight"): lora_b},
              str(upstream / "checkpoint-7" / "adapter_model.safetensors"))
    torch.save({"base_model.model.rm_head.weight": head, _old_key(merger): merger_weight},
               upstream / "checkpoint-7" / "non_lora_state_dict.pth")

    model, processor = IdentityRewardModel.from_pretrained(upstream)
    state = model.backbone.state_dict()
    # alpha / r = 2
    torch.testing.assert_close(state[f"{q_proj}.weight"], base.state_dict()[f"{q_proj}.weight"] + 2.0 * lora_b @ lora_a)
    assert torch.equal(state[merger], merger_weight)
    assert torch.equal(model.reward_head.weight, head)
    assert model.config.num_frames == 5 and model.config.max_frame_pixels == 3136
    assert processor.tokenizer.convert_tokens_to_ids("<|SA_reward|>") == len(base_processor.tokenizer)
    frames, references, prompts = random_batch(batch_size=2)
    assert torch.isfinite(IdentityRewardScorer(model, processor).score_frames(frames, references, prompts)).all()

    with pytest.raises(FileNotFoundError, match="checkpoint-3"):
        IdentityRewardModel.from_pretrained(upstream, checkpoint_step=3)


def test_not_a_reward_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IdentityRewardModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="reward_config.json"):
        IdentityRewardModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ GRPO registry entry

def grpo_config(path, **reward_model):
    config = ml_collections.ConfigDict()
    config.pretrained = ml_collections.ConfigDict({"reward_model": str(path), "build_tiny": False})
    config.reward_fn = ml_collections.ConfigDict({"identity": 1.0})
    if reward_model:
        config.reward_model = ml_collections.ConfigDict(reward_model)
    return config


def test_identity_reward_matches_scorer(tiny_dir, scorer):
    fn = REGISTRY["identity"](grpo_config(tiny_dir, batch_size=2), torch.device("cpu"))
    frames, references, prompts = random_batch(batch_size=4, num_frames=5, size=32)
    inputs = RewardInputs(frames=frames, reference_images=references, prompts=prompts)
    out = fn(inputs)
    assert set(out) == {"identity"} and out["identity"].shape == (4,)
    torch.testing.assert_close(out["identity"], scorer.score_frames(frames, references, prompts)[:, 0], atol=1e-5, rtol=0)


def test_identity_reward_through_build_reward_fn_builds_tiny_model(tmp_path):
    config = grpo_config(tmp_path / "reward")
    config.pretrained.build_tiny = True
    combined = build_reward_fn(config, torch.device("cpu"))
    frames, references, prompts = random_batch(batch_size=2)
    scores, seconds = combined(RewardInputs(frames=frames, reference_images=references, prompts=prompts))
    assert torch.equal(scores["total"], scores["identity"]) and scores["total"].shape == (2,)
    assert (tmp_path / "reward" / REWARD_CONFIG_NAME).is_file()


def test_identity_reward_rejects_too_many_references(tiny_dir):
    fn = REGISTRY["identity"](grpo_config(tiny_dir), torch.device("cpu"))
    frames, references, prompts = random_batch(batch_size=1)
    with pytest.raises(ValueError, match="1-4"):
        fn(RewardInputs(frames=frames, reference_images=[references[0] * 5], prompts=prompts))
