"""FaceSim-Arc: the pure matching core with hand-built vectors, the tiny offline backend end to end,
the onnxruntime embedder with a tiny ONNX model written here, and the insightface backend's errors."""

import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from identity_grpo.rewards import RewardInputs, build_reward_fn
from identity_grpo.rewards.facesim import (
    FaceSimScorer,
    MeanColorEmbedder,
    TileFaceDetector,
    facesim_columns,
    frame_indices,
    match_faces,
    pad_embeddings,
)

A, B = [1.0, 0.0], [0.0, 1.0]


def _match(face_rows, reference_rows):
    faces, face_mask = pad_embeddings([[torch.tensor(f).reshape(-1, 2) for f in video] for video in face_rows], dim=2)
    references, reference_mask = pad_embeddings([[torch.tensor([r]) for r in refs] for refs in reference_rows], dim=2)
    return match_faces(faces, face_mask, references[:, :, 0], reference_mask[:, :, 0])


def test_identical_faces_score_one_whatever_their_norm():
    scores = _match([[[[2.0, 0.0], [0.0, 5.0]], [[0.0, 3.0], [0.5, 0.0]]]], [[A, B]])
    assert torch.allclose(scores.per_subject, torch.ones(1, 2))
    assert scores.mean.tolist() == pytest.approx([1.0]) and scores.min.tolist() == pytest.approx([1.0])
    assert scores.skipped_frames.tolist() == [0]


def test_best_face_per_frame_average_over_frames_and_skipped_frame():
    # Frame 0 shows A and B exactly: (1, 1). Frame 1 shows one face (3, 4): cos with A = 0.6, with B = 0.8.
    # Frame 2 has no face: skipped, not a zero. A: (1 + 0.6) / 2 = 0.8, B: (1 + 0.8) / 2 = 0.9.
    scores = _match([[[A, B], [[3.0, 4.0]], []]], [[A, B]])
    assert scores.per_subject[0].tolist() == pytest.approx([0.8, 0.9])
    assert scores.mean.tolist() == pytest.approx([0.85])
    assert scores.min.tolist() == pytest.approx([0.8])
    assert scores.skipped_frames.tolist() == [1] and scores.num_frames.tolist() == [3]


def test_negative_cosine_is_clipped_at_zero_and_min_is_the_worst_subject():
    # Only A's face is in the video; (-1, 0) is the opposite of A and would give -1 unclipped.
    # A: frames (1, 0) -> 1 and (-1, 0) -> 0: 0.5. B: 0 in both frames. Mean 0.25, min 0 (subject B).
    scores = _match([[[A], [[-1.0, 0.0]]]], [[A, B]])
    assert scores.per_subject[0].tolist() == pytest.approx([0.5, 0.0])
    assert scores.mean.tolist() == pytest.approx([0.25])
    assert scores.min.tolist() == [0.0]


def test_padded_references_and_faces_do_not_count():
    # Video 0 has one reference (A), video 1 two; video 0's second reference slot is padding.
    # Video 1 frame 0 has faces [B, (1, 1)] (the second slot padded in video 0's frame):
    # A -> max(0, 1/sqrt2) = 0.70711, B -> 1.
    scores = _match([[[A]], [[B, [1.0, 1.0]]]], [[A], [A, B]])
    assert scores.subject_mask.tolist() == [[True, False], [True, True]]
    assert scores.per_subject.tolist()[0] == pytest.approx([1.0, 0.0])
    assert scores.mean.tolist() == pytest.approx([1.0, (1 / math.sqrt(2) + 1.0) / 2])
    assert scores.min.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])


def test_video_with_no_face_at_all_scores_zero_and_counts_every_frame_skipped():
    scores = _match([[[], []]], [[A]])
    assert scores.mean.tolist() == [0.0] and scores.min.tolist() == [0.0]
    assert scores.skipped_frames.tolist() == [2]


def test_core_errors():
    with pytest.raises(ValueError, match="no reference"):
        match_faces(torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 2),
                    torch.zeros(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        match_faces(torch.full((1, 1, 1, 2), float("nan")), torch.ones(1, 1, 1, dtype=torch.bool),
                    torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="different sizes"):
        pad_embeddings([[torch.zeros(1, 2), torch.zeros(1, 3)]])


def test_frame_indices_are_uniform():
    assert frame_indices(9, 3) == [0, 4, 8]
    assert frame_indices(4, 0) == [0, 1, 2, 3]


# ------------------------------------------------------------------ tiny backend end to end

RED, BLUE, YELLOW = (255, 0, 0), (0, 0, 255), (255, 255, 0)


def _frame(top_left=None, bottom_right=None):
    """8x8 black frame with up to two coloured 4x4 tiles (the tiny detector's "faces")."""
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    if top_left:
        frame[:4, :4] = top_left
    if bottom_right:
        frame[4:, 4:] = bottom_right
    return frame


def _solid(colour):
    return Image.new("RGB", (8, 8), colour)


def test_tiny_backend_identical_swapped_and_missing_faces():
    scorer = FaceSimScorer(TileFaceDetector(grid=2, threshold=0.1), MeanColorEmbedder())
    video = np.stack([_frame(RED, BLUE), _frame(BLUE, RED), _frame()])  # third frame: no face
    frames = torch.from_numpy(np.stack([video, video]))
    # Video 0: references are the people in the video. Video 1: yellow replaces blue. The chroma
    # of yellow (1/3, 1/3, -2/3) has cosine 0.5 with red's (2/3, -1/3, -1/3) and -0.5 with blue's.
    scores = scorer.score(frames, [[_solid(RED), _solid(BLUE)], [_solid(RED), _solid(YELLOW)]])
    assert scores.per_subject.tolist()[0] == pytest.approx([1.0, 1.0])
    assert scores.per_subject.tolist()[1] == pytest.approx([1.0, 0.5])
    assert scores.min.tolist() == pytest.approx([1.0, 0.5])
    assert scores.mean.tolist() == pytest.approx([1.0, 0.75])
    assert scores.skipped_frames.tolist() == [1, 1]
    rows = facesim_columns(scores)
    assert rows[1] == pytest.approx({"FaceSim-Arc": 0.75, "FaceSim-Arc/min": 0.5, "FaceSim-Arc/skipped_frames": 1,
                                     "FaceSim-Arc/subject_0": 1.0, "FaceSim-Arc/subject_1": 0.5})


def test_reference_without_a_face_names_the_video_and_reference():
    scorer = FaceSimScorer(TileFaceDetector(), MeanColorEmbedder())
    frames = torch.from_numpy(_frame(RED)[None, None].copy())
    with pytest.raises(ValueError, match="reference image 1 of video 0"):
        scorer.score(frames, [[_solid(RED), _solid((0, 0, 0))]])


def test_facesim_reward_through_the_registry():
    config = SimpleNamespace(reward_fn={"facesim": 1.0}, facesim={"backend": "tiny", "num_frames": 2})
    reward_fn = build_reward_fn(config, torch.device("cpu"))
    # num_frames 2 of 3 keeps frames 0 and 2: the red-only frame and the empty one.
    frames = torch.from_numpy(np.stack([_frame(RED), _frame(BLUE), _frame()])[None].copy())
    inputs = RewardInputs(frames, [[_solid(RED), _solid(BLUE)]], ["two people"])
    scores, seconds = reward_fn(inputs)
    # red -> 1, blue -> max(0, cos(blue, red) = -0.5) = 0 in the one kept frame.
    assert scores["facesim"].tolist() == pytest.approx([0.5])
    assert scores["facesim/min"].tolist() == [0.0]
    assert scores["facesim/skipped_frames"].tolist() == [1.0]
    assert scores["total"].tolist() == pytest.approx([0.5])
    assert set(seconds) == {"facesim"}


# ------------------------------------------------------------------ onnxruntime / insightface backends


def _write_tiny_arcface(path):
    """A 3-output "ArcFace": mean over the 112x112 crop per channel, then minus the channel mean."""
    import onnx
    from onnx import TensorProto, helper

    centring = (np.eye(3) - 1.0 / 3.0).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "centring"], ["embedding"]),
        ],
        "tiny_arcface",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("centring", TensorProto.FLOAT, [3, 3], centring.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="onnx and onnxruntime are optional (pip install onnx onnxruntime)")
def test_onnx_embedder_matches_the_tiny_embedder(tmp_path):
    from identity_grpo.rewards.facesim import OnnxArcFaceEmbedder

    _write_tiny_arcface(tmp_path / "arcface.onnx")
    onnx_scorer = FaceSimScorer(TileFaceDetector(), OnnxArcFaceEmbedder(tmp_path / "arcface.onnx"))
    frames = torch.from_numpy(np.stack([_frame(RED, BLUE), _frame()])[None].copy())
    scores = onnx_scorer.score(frames, [[_solid(RED), _solid(YELLOW)]])
    # (x - 127.5) / 127.5 then centring is 2x the tiny embedder's chroma: the same cosines.
    assert scores.per_subject.tolist()[0] == pytest.approx([1.0, 0.5], abs=1e-5)
    assert scores.skipped_frames.tolist() == [1]


def test_insightface_backend_names_the_config_field_and_the_install(tmp_path):
    with pytest.raises(ValueError, match="config.facesim.detector_path"):
        FaceSimScorer.from_config(SimpleNamespace(facesim={}))
    with pytest.raises(FileNotFoundError, match="config.facesim.embedder_path"):
        FaceSimScorer.from_config(SimpleNamespace(facesim={"detector_path": __file__,
                                                           "embedder_path": str(tmp_path / "missing.onnx")}))
    if importlib.util.find_spec("insightface") is None:
        with pytest.raises(ImportError, match="pip install insightface onnxruntime"):
            FaceSimScorer.from_config(SimpleNamespace(facesim={"detector_path": __file__, "embedder_path": __file__}))
    with pytest.raises(ValueError, match="'insightface', 'dlib' or 'tiny'"):
        FaceSimScorer.from_config(SimpleNamespace(facesim={"backend": "arcface"}))


def test_dlib_backend_names_the_models_folder_field(tmp_path):
    pytest.importorskip("dlib", reason="dlib is in the 'faces' extra (bash scripts/install.sh dev installs it)")
    with pytest.raises(FileNotFoundError, match="config.facesim.dlib_models_dir"):
        FaceSimScorer.from_config(SimpleNamespace(facesim={"backend": "dlib", "dlib_models_dir": str(tmp_path)}))


def test_copy_paste_of_the_tiny_backend_by_hand():
    from identity_grpo.rewards.copy_paste import copy_paste_scorer

    # Tiny crops are the face boxes; a flat tile has no texture, so give the reference and the frame
    # two-tone tiles: the same pattern scores 1, the pattern upside down -1 (clipped to 0).
    def tile(top, bottom):
        image = np.zeros((8, 8, 3), dtype=np.uint8)
        image[:4, :4], image[2:4, :4] = top, bottom
        return image

    scorer = copy_paste_scorer(FaceSimScorer(TileFaceDetector(), MeanColorEmbedder()), size=4)
    frames = torch.from_numpy(np.stack([tile(RED, BLUE), tile(BLUE, RED)])[None].copy())
    scores = scorer.score(frames, [[Image.fromarray(tile(RED, BLUE))]])
    assert scores.per_subject[0].tolist() == pytest.approx([0.5])  # frame 0: 1, frame 1: max(0, -1)
