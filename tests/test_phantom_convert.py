"""Loading Phantom's DiT from an original-format Wan ``.pth`` (written here) or a diffusers folder."""

from pathlib import Path

import pytest
import torch

from identity_grpo.phantom_convert import CheckpointConversionError, load_phantom_transformer
from identity_grpo.testing import build_t2v_transformer, build_tiny_phantom_dit, to_original_wan_keys

# Names as they appear in the released Wan / Phantom checkpoints (original Wan code).
RELEASED_NAMES = [
    "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
    "time_projection.1.weight", "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias",
    "blocks.0.self_attn.norm_q.weight", "blocks.1.cross_attn.k.weight", "blocks.1.norm3.weight",
    "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias", "head.head.weight", "head.modulation",
]


@pytest.fixture(scope="module")
def dit():
    return build_tiny_phantom_dit(seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A T2V base folder as far as conversion needs it: ``transformer/config.json``."""
    folder = tmp_path_factory.mktemp("t2v_base")
    build_t2v_transformer().save_config(folder / "transformer")
    return folder


def write_pth(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path


def test_original_pth_loads_bit_exactly(dit, base, tmp_path):
    original = to_original_wan_keys(dit.state_dict())
    assert set(RELEASED_NAMES) <= set(original)
    assert len(original) == len(dit.state_dict()) == 69
    loaded = load_phantom_transformer(write_pth(tmp_path / "phantom.pth", original), base)
    expected = dit.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Same function, not just the same tensors: buffers (RoPE tables) are built, not loaded.
    hidden = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(loaded(hidden, timestep, text, return_dict=False)[0],
                           dit(hidden, timestep, text, return_dict=False)[0])


def write_shards(folder: Path, state: dict, name: str = "Phantom_Wan_14B") -> Path:
    """``state`` as two safetensors shards and their index, laid out as Phantom-Wan-14B is released."""
    import json

    from safetensors.torch import save_file

    keys = sorted(state)
    halves = {f"{name}-00001-of-00002.safetensors": keys[::2], f"{name}-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in halves.items():
        save_file({key: state[key].contiguous() for key in names}, str(folder / shard))
    index = folder / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {key: shard for shard, names in halves.items()
                                                                 for key in names}}))
    return index


def test_sharded_safetensors_load_like_the_pth(dit, base, tmp_path):
    original = to_original_wan_keys(dit.state_dict())
    index = write_shards(tmp_path, original)
    loaded = load_phantom_transformer(index, base)
    expected = dit.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    (tmp_path / "Phantom_Wan_14B-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="Phantom_Wan_14B-00002-of-00002.safetensors"):
        load_phantom_transformer(index, base)


def test_phantom14b_preset_points_at_the_sharded_release():
    from config.dgx import get_config
    from identity_grpo.configuration import validate_config

    config = get_config("phantom14b")
    validate_config(config, num_processes=8)
    assert config.pretrained.phantom_dit.endswith("Phantom_Wan_14B.safetensors.index.json")
    assert config.pretrained.model == "Wan-AI/Wan2.1-T2V-14B-diffusers" and config.model_type == "phantom"


def test_wrapped_and_prefixed_checkpoint_loads(dit, base, tmp_path):
    # A training framework's {"state_dict": ...} container with DDP's "module." prefix.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in to_original_wan_keys(dit.state_dict()).items()}}
    loaded = load_phantom_transformer(write_pth(tmp_path / "wrapped.pth", wrapped), base)
    assert torch.equal(loaded.proj_out.weight, dit.proj_out.weight)


def test_missing_and_unexpected_keys_are_named(dit, base, tmp_path):
    original = to_original_wan_keys(dit.state_dict())
    del original["blocks.1.self_attn.q.weight"]
    original["img_emb.proj.0.weight"] = torch.ones(16)  # an I2V-only weight
    with pytest.raises(CheckpointConversionError) as error:
        load_phantom_transformer(write_pth(tmp_path / "bad.pth", original), base)
    message = str(error.value)
    assert "missing keys: blocks.1.attn1.to_q.weight" in message
    assert "unexpected keys: condition_embedder.image_embedder.norm1.weight" in message
    assert "bad.pth" in message


def test_shape_mismatch_is_named(base, tmp_path):
    from diffusers import WanTransformer3DModel

    wider = WanTransformer3DModel.from_config({**build_t2v_transformer().config, "ffn_dim": 48})
    with pytest.raises(CheckpointConversionError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight \(48, 16\) vs \(32, 16\)"):
        load_phantom_transformer(write_pth(tmp_path / "wide.pth", to_original_wan_keys(wider.state_dict())), base)


def test_missing_file_names_the_field(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained.phantom_dit"):
        load_phantom_transformer(tmp_path / "nope.pth", base)


def test_converted_diffusers_folder_and_half_precision(dit, base, tmp_path):
    dit.save_pretrained(tmp_path / "converted")
    from_folder = load_phantom_transformer(tmp_path / "converted", base)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in from_folder.state_dict().items())
    # bf16 from the .pth casts like from_pretrained(torch_dtype=bf16): same dtypes, same values.
    pth = write_pth(tmp_path / "phantom.pth", to_original_wan_keys(dit.state_dict()))
    converted = load_phantom_transformer(pth, base, dtype=torch.bfloat16)
    reference = load_phantom_transformer(tmp_path / "converted", base, dtype=torch.bfloat16)
    assert converted.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert converted.scale_shift_table.dtype == torch.float32  # kept fp32 for stability
    for (key, value), (_, expected) in zip(converted.state_dict().items(), reference.state_dict().items()):
        assert value.dtype == expected.dtype and torch.equal(value, expected), key
