"""OpenS2V-Eval's FaceSim-Arc, FaceSim-Cur and Aesthetics as batch inference computes them, from
local weight files: the CurricularFace IR-101 layout that the released checkpoint loads into, a
tiny IR network loaded back from a file and scored on frames whose numbers are worked out by hand,
insightface's own recognition code on a tiny ONNX model, and the ``config.opens2v`` start-up check."""

import importlib.util
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from identity_grpo.metrics.curricularface import IR101_UNITS, IR101_WIDTHS, IRBackbone, load_ir_backbone
from identity_grpo.metrics.opens2v import CurricularFaceEmbedder, OpenS2VFaceSim
from identity_grpo.metrics.opens2v_eval import OpenS2VMetrics, validate_opens2v_config
from identity_grpo.rewards.facesim import DetectedFace

needs_insightface = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("insightface", "onnx", "onnxruntime", "cv2")),
    reason="insightface, onnx, onnxruntime and OpenCV come with bash scripts/install.sh dev")

EPS = 1e-5  # torch's BatchNorm eps, which TFace keeps


# ------------------------------------------------------------------ the IR-101 layout


def _bn(prefix: str, channels: int, affine: bool = True) -> dict[str, tuple]:
    keys = {f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
            f"{prefix}.num_batches_tracked": ()}
    if affine:
        keys |= {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}
    return keys


def _released_layout() -> dict[str, tuple]:
    """Key -> shape of TFace's IR_101([112, 112]) state dict, written out from its model_irse.py."""
    keys = {"input_layer.0.weight": (64, 3, 3, 3), **_bn("input_layer.1", 64), "input_layer.2.weight": (64,)}
    unit, channels = 0, 64
    for count, width in zip((3, 13, 30, 3), (64, 128, 256, 512)):
        for _ in range(count):
            prefix = f"body.{unit}"
            keys |= {**_bn(f"{prefix}.res_layer.0", channels), f"{prefix}.res_layer.1.weight": (width, channels, 3, 3),
                     **_bn(f"{prefix}.res_layer.2", width), f"{prefix}.res_layer.3.weight": (width,),
                     f"{prefix}.res_layer.4.weight": (width, width, 3, 3), **_bn(f"{prefix}.res_layer.5", width)}
            if channels != width:
                keys |= {f"{prefix}.shortcut_layer.0.weight": (width, channels, 1, 1),
                         **_bn(f"{prefix}.shortcut_layer.1", width)}
            unit, channels = unit + 1, width
    keys |= {**_bn("output_layer.0", 512), "output_layer.3.weight": (512, 512 * 7 * 7), "output_layer.3.bias": (512,),
             **_bn("output_layer.4", 512, affine=False)}
    return keys


def test_ir101_has_the_released_checkpoints_keys_and_shapes():
    torch.manual_seed(0)
    model = IRBackbone().eval()
    layout = _released_layout()
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == layout
    assert model.units == IR101_UNITS and model.widths == IR101_WIDTHS and model.is_ir101
    # 49 units; the three conv shortcuts open stages 2-4; the first unit's is a max-pool (64 -> 64).
    assert sum(1 for key in layout if re.fullmatch(r"body\.\d+\.res_layer\.1\.weight", key)) == 49
    assert [int(key.split(".")[1]) for key in layout if key.endswith("shortcut_layer.0.weight")] == [3, 16, 46]
    # The file reads back as IR-101 and loads strictly (from_state_dict raises otherwise).
    reloaded = IRBackbone.from_state_dict(model.state_dict())
    assert reloaded.is_ir101
    with torch.no_grad():
        embedding = reloaded(torch.rand(1, 3, 112, 112) * 2 - 1)
    assert embedding.shape == (1, 512) and bool(torch.isfinite(embedding).all())


def _functional_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """The IR forward written with torch.nn.functional from the keys alone (eval mode)."""
    def bn(x, prefix):
        return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias"), False, 0.0, EPS)

    x = F.prelu(bn(F.conv2d(pixels, state["input_layer.0.weight"], padding=1), "input_layer.1"),
                state["input_layer.2.weight"])
    for unit, stride in enumerate(strides):
        p = f"body.{unit}"
        residual = bn(x, f"{p}.res_layer.0")
        residual = F.conv2d(residual, state[f"{p}.res_layer.1.weight"], padding=1)
        residual = F.prelu(bn(residual, f"{p}.res_layer.2"), state[f"{p}.res_layer.3.weight"])
        residual = bn(F.conv2d(residual, state[f"{p}.res_layer.4.weight"], stride=stride, padding=1), f"{p}.res_layer.5")
        if f"{p}.shortcut_layer.0.weight" in state:
            shortcut = bn(F.conv2d(x, state[f"{p}.shortcut_layer.0.weight"], stride=stride), f"{p}.shortcut_layer.1")
        else:
            shortcut = x[:, :, ::stride, ::stride]
        x = residual + shortcut
    x = bn(x, "output_layer.0").flatten(1)
    return bn(F.linear(x, state["output_layer.3.weight"], state["output_layer.3.bias"]), "output_layer.4")


def test_a_tiny_ir_network_computes_the_functional_forward_of_its_weights():
    torch.manual_seed(0)
    model = IRBackbone(units=(1, 2, 1, 1), widths=(4, 6, 8, 10), embedding_dim=5, input_size=32)
    with torch.no_grad():  # trained-looking statistics, so every BatchNorm matters
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        for parameter in model.parameters():
            if parameter.ndim == 1:  # BatchNorm scales and shifts, PReLU slopes, the Linear bias
                parameter.normal_(0, 0.5)
    model.eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = _functional_forward(model.state_dict(), pixels, strides=[2, 2, 1, 2, 2])
        assert model(pixels) == pytest.approx(expected, abs=1e-5)
        assert expected.abs().max() > 0.1


def _mean_colour_backbone() -> IRBackbone:
    """A tiny IR network (112 px input, as Cur feeds it) with weights set by hand so that it
    computes, per colour channel, the mean of its input over the 7 x 7 grid that the four stride-2
    stages keep: every residual branch is zero, the stem, shortcuts and BatchNorms pass the colour
    channels through, and the Linear layer averages. On a uniform crop of colour c the embedding is
    ``(c / 255 - 0.5) / 0.5`` (then zeros)."""
    model = IRBackbone(units=(1, 2, 1, 1), widths=(4, 6, 8, 10), embedding_dim=5, input_size=112)
    state = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    for key, value in state.items():
        if key.endswith("running_var"):
            value.fill_(1.0 - EPS)  # sqrt(var + eps) = 1: every BatchNorm with weight 1 is the identity
        if re.fullmatch(r"(input_layer\.1|body\.\d+\.shortcut_layer\.1|output_layer\.0)\.weight", key):
            value.fill_(1.0)
    state["input_layer.2.weight"].fill_(1.0)  # PReLU slope 1: the identity
    for channel in range(3):
        state["input_layer.0.weight"][channel, channel, 1, 1] = 1.0
        for key, value in state.items():
            if key.endswith("shortcut_layer.0.weight"):
                value[channel, channel, 0, 0] = 1.0
        state["output_layer.3.weight"][channel, channel * 49:(channel + 1) * 49] = 1 / 49
    model.load_state_dict(state)
    return model


RED, YELLOW, WHITE, BLACK = (255, 0, 0), (255, 255, 0), (255, 255, 255), (0, 0, 0)
SIDE = 64


class CentreFaceDetector:
    """Stand-in detector: one face filling a ``SIDE x SIDE`` frame unless its centre is black, its 5
    keypoints the ArcFace template scaled to the square [8, 56], so the aligned crops (112 for Arc,
    224 for Cur) see only the face's colour."""

    def detect(self, image):
        from insightface.utils.face_align import arcface_dst

        height, width = image.shape[:2]
        if (image[height // 2, width // 2] == 0).all():
            return []
        return [DetectedFace((0.0, 0.0, float(width), float(height)), 0.9, arcface_dst * (48 / 112) + 8)]


def _solid(colour) -> np.ndarray:
    return np.tile(np.array(colour, dtype=np.uint8), (SIDE, SIDE, 1))


def _write_mean_colour_arcface(path) -> None:
    """A tiny ONNX "recognition model" insightface routes to its ArcFaceONNX (one 112 x 112 input,
    one output): the per-channel mean of its input blob, ``(x - 127.5) / 127.5`` in RGB order."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1)],
        "mean_colour", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@needs_insightface
def test_facesim_arc_and_cur_from_weight_files_against_hand_numbers(tmp_path):
    from insightface.model_zoo import get_model

    from identity_grpo.metrics.opens2v import InsightFaceRecognition

    _write_mean_colour_arcface(tmp_path / "recognition.onnx")
    arc = InsightFaceRecognition(get_model(str(tmp_path / "recognition.onnx"), providers=["CPUExecutionProvider"]))
    torch.save(_mean_colour_backbone().state_dict(), tmp_path / "curricularface.bin")
    backbone = load_ir_backbone(tmp_path / "curricularface.bin")
    assert (backbone.units, backbone.widths, backbone.is_ir101) == ((1, 2, 1, 1), (4, 6, 8, 10), False)
    cur = CurricularFaceEmbedder(backbone)

    # Both embed a red face as (1, -1, -1): insightface's blob is RGB, (x - 127.5) / 127.5; Cur's
    # input is (x / 255 - 0.5) / 0.5 of the aligned crop.
    face = CentreFaceDetector().detect(_solid(RED))
    assert arc.embed(_solid(RED), face)[0].tolist() == pytest.approx([1, -1, -1], abs=1e-6)
    assert cur.embed(_solid(RED), face)[0, :3].tolist() == pytest.approx(np.array([1, -1, -1]) / 3 ** 0.5, abs=1e-5)

    # Against a red reference: red 1, yellow (1, 1, -1) 1/3, white (1, 1, 1) -1/3 clipped to 0, black: no
    # face. OpenS2V's 32 indices over 4 frames weight them 11, 10, 10, 1 (black is frame 2).
    frames = np.stack([_solid(RED), _solid(YELLOW), _solid(BLACK), _solid(WHITE)])
    metrics = OpenS2VMetrics(motion=False, facesim=OpenS2VFaceSim(CentreFaceDetector(), arc, cur))
    columns = metrics.columns(frames, [_solid(BLACK), _solid(RED)])  # the first reference with a face counts
    # Arc keeps the clipped zero: (11 + 10/3 + 0) / 22 = 43/66; Cur drops it: (11 + 10/3) / 21 = 43/63.
    assert columns["OpenS2V/FaceSim-Arc"] == pytest.approx(43 / 66, abs=1e-5)
    assert columns["OpenS2V/FaceSim-Cur"] == pytest.approx(43 / 63, abs=1e-5)
    assert columns["OpenS2V/face_frames"] == 22
    assert metrics.columns(frames, [_solid(BLACK)]) == {}  # no reference face: no FaceSim columns


def test_a_weights_file_that_does_not_fit_names_the_field(tmp_path):
    state = _mean_colour_backbone().state_dict()
    del state["body.2.res_layer.2.running_var"]
    torch.save(state, tmp_path / "missing_key.bin")
    with pytest.raises(ValueError, match=r"opens2v\.curricularface_path.*missing_key\.bin.*running_var"):
        load_ir_backbone(tmp_path / "missing_key.bin")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="not an IR backbone"):
        load_ir_backbone(tmp_path / "other.bin")
    with pytest.raises(ValueError, match=r"opens2v\.curricularface_path.*is not a file"):
        load_ir_backbone(tmp_path / "absent.bin")


@needs_insightface
def test_a_face_models_folder_without_a_detector_names_the_field(tmp_path):
    from identity_grpo.metrics.opens2v import load_face_models

    _write_mean_colour_arcface(tmp_path / "w600k_r50.onnx")
    with pytest.raises(ValueError, match=r"opens2v\.face_models_dir.*no insightface detection model.*recognition"):
        load_face_models(tmp_path)


# ------------------------------------------------------------------ Aesthetics from files


def test_aesthetics_from_a_clip_folder_and_head_file(tmp_path):
    from identity_grpo.testing import write_tiny_aesthetics

    clip_folder, head_file = write_tiny_aesthetics(tmp_path, score=6.5)
    config = {"opens2v": {"motion": False, "clip_path": str(clip_folder), "aesthetic_head_path": str(head_file)}}
    validate_opens2v_config(config)
    metrics = OpenS2VMetrics.from_config(config)
    assert metrics.names == ["Aesthetics"]
    # The head's weights are zero and its last bias 6.5: the number the file must produce.
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    assert metrics.columns(frames, []) == {"OpenS2V/Aesthetics": pytest.approx(6.5, abs=1e-6)}
    # A head for 768-D embeddings (the real CLIP's) against this 4-D CLIP names the field.
    from identity_grpo.rewards.composite import AestheticHead

    torch.save(AestheticHead(768).state_dict(), tmp_path / "head_768.pth")
    config["opens2v"]["aesthetic_head_path"] = str(tmp_path / "head_768.pth")
    with pytest.raises(ValueError, match=r"opens2v\.aesthetic_head_path.*4-D"):
        OpenS2VMetrics.from_config(config)


# ------------------------------------------------------------------ start-up check


def test_the_startup_check_names_each_field(tmp_path):
    import ml_collections

    from config.base import get_config

    config = get_config()
    validate_opens2v_config(config)  # the defaults: Motion on, the rest off
    assert OpenS2VMetrics.from_config(config).names == ["Motion"]

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    config.opens2v = ml_collections.ConfigDict(dict(
        config.opens2v, face_models_dir=str(tmp_path / "no_such_folder"), clip_path=str(tmp_path),
        curricularface_path=str(weights), zero_handling="sometimes", det_size=300))
    with pytest.raises(ValueError) as error:
        validate_opens2v_config(config)
    message = str(error.value)
    assert "opens2v.face_models_dir = " in message and "no_such_folder" in message and "set it to ''" in message
    assert "opens2v.clip_path and opens2v.aesthetic_head_path" in message
    assert "opens2v.zero_handling ('sometimes')" in message
    assert "opens2v.det_size (300)" in message
    assert "curricularface_path = " not in message  # it exists

    empty = tmp_path / "empty_models"
    empty.mkdir()
    for section, expected in (
        ({"curricularface_path": str(weights)}, "curricularface_path is set but opens2v.face_models_dir is empty"),
        ({"face_models_dir": str(empty)}, "holds no .onnx file"),
        ({"curricularface_path": str(tmp_path / "absent.bin"), "face_models_dir": str(empty)},
         "opens2v.curricularface_path = "),
        ({"detsize": 320}, "unknown fields ['detsize']"),
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            validate_opens2v_config({"opens2v": section})
