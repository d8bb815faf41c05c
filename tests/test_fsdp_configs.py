"""The shipped accelerate configs and the 14B preset, checked without launching anything (the
launches are in test_multiprocess.py)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.utils import DistributedType

from identity_grpo.configuration import validate_config
from identity_grpo.models import WAN_BLOCK_CLASSES, fsdp2_plugin
from identity_grpo.testing import load_preset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "accelerate_configs"


preset = load_preset


def test_vace14b_preset_validates_and_only_changes_the_model():
    config, vace = preset("vace14b"), preset("vace")
    assert config.pretrained.model == "Wan-AI/Wan2.1-VACE-14B-diffusers"
    for processes in (8, 16):  # one node, two nodes of 8 GPUs
        validate_config(config, processes)
    config.pretrained.model, config.run_name = vace.pretrained.model, vace.run_name
    assert config.to_dict() == vace.to_dict()


def test_shipped_configs_are_the_tested_ones():
    """Every config here is launched by a test (DDP and FSDP2 on CPU) or, for the multi-node ones,
    differs from a launched one only in its machine layout."""
    names = sorted(path.name for path in CONFIGS.glob("*.yaml"))
    assert names == ["fsdp2.yaml", "fsdp2_hybrid_multi_node.yaml", "multi_gpu.yaml", "multi_node.yaml"]
    single, multi = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("fsdp2.yaml", "fsdp2_hybrid_multi_node.yaml"))
    assert multi["fsdp_config"] == single["fsdp_config"]
    assert multi["parallelism_config"]["parallelism_config_dp_replicate_size"] == multi["num_machines"]
    replicas, shards = (multi["parallelism_config"][f"parallelism_config_dp_{k}_size"] for k in ("replicate", "shard"))
    assert replicas * shards == multi["num_processes"]
    ddp, nodes = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("multi_gpu.yaml", "multi_node.yaml"))
    assert {k: v for k, v in nodes.items() if k not in ("num_machines", "num_processes", "machine_rank")} == {
        k: v for k, v in ddp.items() if k not in ("num_machines", "num_processes", "machine_rank")}


def test_fsdp2_config_wraps_every_wan_block():
    from identity_grpo.testing import build_t2v_transformer, build_vace_transformer

    fsdp = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_activation_checkpointing"] is False
    names = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert sorted(names) == sorted(WAN_BLOCK_CLASSES)
    vace, t2v = build_vace_transformer(), build_t2v_transformer()  # VACE, and Phantom's T2V architecture
    assert sum(type(m).__name__ in names for m in vace.modules()) == len(vace.blocks) + len(vace.vace_blocks)
    assert sum(type(m).__name__ in names for m in t2v.modules()) == len(t2v.blocks)


@pytest.mark.parametrize("setting, message", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing: true"),
])
def test_unsupported_fsdp_settings_name_the_field(monkeypatch, setting, message):
    # What `accelerate launch --config_file fsdp2.yaml` sets, as CPU ranks read it.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(WAN_BLOCK_CLASSES))
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    assert fsdp2_plugin(accelerator).transformer_cls_names_to_wrap == list(WAN_BLOCK_CLASSES)
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        fsdp2_plugin(accelerator)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp2_plugin(accelerator) is None  # DDP
