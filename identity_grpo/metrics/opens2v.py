"""OpenS2V-Eval metrics computed as its evaluation code computes them (PKU-YuanGroup/OpenS2V-Nexus,
``eval/get_facesim.py``, ``eval/get_motionscore.py``, ``eval/get_aesscore.py``); our own code.

Frames are in-memory RGB uint8 ``(F, H, W, 3)`` arrays; OpenS2V decodes its mp4 files with decord,
so numbers on the same video differ by the compression of the mp4 only.

**FaceSim-Arc / FaceSim-Cur** (:class:`OpenS2VFaceSim`):

1. 32 frames at ``np.linspace(0, F - 1, 32, dtype=int)`` (truncation, not rounding; repeated
   indices when the video has fewer than 32 frames) -- :func:`sample_indices`.
2. In each frame and in the reference: insightface detection (``det_size`` 320 in OpenS2V), the
   **largest** face by box area; if there is none, retry on the image padded with grey (128) by
   ``int(0.25 * h)`` above and below and ``int(0.25 * w)`` left and right (:func:`pad_grey`), and
   shift the keypoints back.
3. Arc: the ArcFace embedding insightface computes on the image the face was found in (padded or
   not) -- :class:`InsightFaceRecognition`, insightface's own recognition code, with the models
   :func:`load_face_models` picks from a local model folder as ``FaceAnalysis`` does. Cur:
   CurricularFace IR-101 on the 5-point aligned crop of the unpadded image (insightface
   ``norm_crop`` at 224, resized to 112, ``(x / 255 - 0.5) / 0.5``), L2-normalised
   (:class:`CurricularFaceEmbedder`; the network is
   :class:`identity_grpo.metrics.curricularface.IRBackbone` or any torch module).
4. Per frame ``max(0, cos(reference, face))``; frames without a face are skipped; the score is the
   mean over the kept frames, 0 if none. OpenS2V keeps clipped zeros in Arc's mean (its check
   ``if arc_scores != 0.0`` compares the list, so it is always true) but drops them from Cur's;
   :func:`opens2v_mean` follows the code by default (``drop_zeros=False`` for Arc, ``True`` for Cur)
   so that numbers are comparable with the leaderboard.

OpenS2V scores one human reference per video. With several references this module scores each
against the frame's largest face (its protocol); the project's ``facesim`` reward instead matches
each reference to its best face, which is what multi-person videos need. Batch inference builds
these metrics from ``config.opens2v`` (:mod:`identity_grpo.metrics.opens2v_eval`).

**Motion** (:func:`farneback_motion`): every frame; grey by ``cv2.COLOR_BGR2GRAY`` applied to RGB
frames (as OpenS2V does: it weights red 0.114 and blue 0.299); Farneback flow between consecutive
frames (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2); each flow map
resized to width 16 (``INTER_AREA``); the maps averaged over time, then **the mean of both signed
components** over the map, absolute value. It is not a mean magnitude: a uniform shift of
``(dx, dy)`` pixels per frame scores ``|dx + dy| / 2``, and opposite motions cancel.

**Aesthetics** (:func:`aesthetic_score`): the LAION MLP on L2-normalised CLIP ViT-L/14 image
embeddings of 32 frames (same indices), mean over frames, on the MLP's 1-10 scale.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from identity_grpo.rewards.facesim import DetectedFace, FaceDetector, FaceEmbedder

NUM_FRAMES = 32
PAD_SCALE = 1.25
PAD_VALUE = 128
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
             "flags": 0}
FLOW_WIDTH = 16


def sample_indices(total: int, num_frames: int | None = NUM_FRAMES) -> list[int]:
    """OpenS2V's frame indices: ``np.linspace(0, total - 1, n, dtype=int)``; every frame for None."""
    if total < 1:
        raise ValueError("the video has no frames")
    if num_frames is None:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


# ------------------------------------------------------------------ FaceSim-Arc / FaceSim-Cur


def pad_grey(image: np.ndarray, scale: float = PAD_SCALE) -> tuple[np.ndarray, tuple[int, int]]:
    """The image padded with grey 128 by ``int(h * (scale - 1))`` above and below and
    ``int(w * (scale - 1))`` left and right, and the ``(left, top)`` offset of the original."""
    if scale < 1.0:
        raise ValueError(f"pad scale must be >= 1, got {scale}")
    height, width = image.shape[:2]
    top, left = int(height * (scale - 1.0)), int(width * (scale - 1.0))
    padded = np.full((height + 2 * top, width + 2 * left, image.shape[2]), PAD_VALUE, dtype=image.dtype)
    padded[top:top + height, left:left + width] = image
    return padded, (left, top)


@dataclass
class FoundFace:
    """The largest face of an image: ``face`` in the coordinates of ``image`` (the padded image when
    the retry found it) and ``original`` in the coordinates of the unpadded image."""

    image: np.ndarray
    face: DetectedFace
    original: DetectedFace


def largest_face(detector: FaceDetector, image: np.ndarray) -> FoundFace | None:
    """The largest face by box area, retrying once on :func:`pad_grey`; None if neither finds one."""
    faces = detector.detect(image)
    if faces:
        face = max(faces, key=lambda f: f.area)
        return FoundFace(image, face, face)
    padded, (left, top) = pad_grey(image)
    faces = detector.detect(padded)
    if not faces:
        return None
    face = max(faces, key=lambda f: f.area)
    x0, y0, x1, y1 = face.box
    keypoints = None if face.keypoints is None else np.asarray(face.keypoints, dtype=np.float32) - [left, top]
    original = DetectedFace((x0 - left, y0 - top, x1 - left, y1 - top), face.score, keypoints)
    return FoundFace(padded, face, original)


def opens2v_mean(similarities: list[float | None], drop_zeros: bool) -> float:
    """Mean over frames of ``max(0, s)``; None (no face) is skipped; with ``drop_zeros`` clipped
    zeros are skipped too (OpenS2V's Cur); 0.0 when nothing is left."""
    kept = [max(0.0, float(s)) for s in similarities if s is not None]
    if drop_zeros:
        kept = [s for s in kept if s != 0.0]
    return float(np.mean(kept)) if kept else 0.0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


class CurricularFaceEmbedder:
    """OpenS2V's CurricularFace input: 5-point aligned 224x224 crop (insightface ``norm_crop``), RGB,
    ``cv2.resize`` to 112x112, ``(x / 255 - 0.5) / 0.5``, NCHW; output L2-normalised.

    Args:
        model: a torch module mapping ``(N, 3, 112, 112)`` to ``(N, D)`` (OpenS2V loads IR-101 from
            ``glint360k_curricular_face_r101_backbone.bin``; any module works here).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        from insightface.utils import face_align

        missing = [i for i, face in enumerate(faces) if face.keypoints is None]
        if missing:
            raise ValueError(f"faces {missing} have no 5-point keypoints; FaceSim-Cur aligns on them, so use a "
                             "detector that gives them (insightface SCRFD)")
        return [face_align.norm_crop(np.ascontiguousarray(image), np.asarray(f.keypoints, dtype=np.float32), 224)
                for f in faces]

    @torch.no_grad()
    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        import cv2

        if not faces:
            return torch.zeros(0, 1)
        crops = np.stack([cv2.resize(crop, (112, 112)) for crop in self.crops(image, faces)])
        pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        embeddings = self.model(pixels.to(self.device)).float().cpu()
        return torch.nn.functional.normalize(embeddings, dim=-1)


class InsightFaceRecognition:
    """FaceSim-Arc's embedder: an insightface recognition model (``ArcFaceONNX``) called as
    insightface's ``FaceAnalysis.get`` calls it, on the BGR image with the detector's keypoints, so
    its own alignment (``norm_crop`` at its input size) and input scaling (chosen from the ONNX
    graph) apply. Embeddings are returned as the model gives them (cosine needs no normalising)."""

    def __init__(self, model):
        if getattr(model, "taskname", None) != "recognition":
            raise ValueError(f"{model!r} is not an insightface recognition model")
        self.model = model

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        from insightface.utils import face_align

        return [face_align.norm_crop(np.ascontiguousarray(image), np.asarray(f.keypoints, dtype=np.float32),
                                     self.model.input_size[0]) for f in faces]

    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        from insightface.app.common import Face

        if not faces:
            return torch.zeros(0, 1)
        if any(face.keypoints is None for face in faces):
            raise ValueError("FaceSim-Arc aligns on the detector's 5 keypoints; use a detector that gives them")
        bgr = np.ascontiguousarray(image[..., ::-1])
        rows = [self.model.get(bgr, Face(bbox=np.asarray(face.box, dtype=np.float32), det_score=face.score,
                                         kps=np.asarray(face.keypoints, dtype=np.float32)))
                for face in faces]
        return torch.from_numpy(np.stack([np.asarray(row, dtype=np.float32).ravel() for row in rows]))


def load_face_models(folder: str | Path, providers: list | None = None, det_size: int = 320,
                     det_thresh: float = 0.5, field: str = "opens2v.face_models_dir"):
    """OpenS2V's face models from a local insightface model folder, picked as insightface's
    ``FaceAnalysis`` picks them: every ``*.onnx`` in name order, the first detection and the first
    recognition model; the detector prepared at ``det_size`` x ``det_size`` (OpenS2V: 320) with
    ``det_thresh`` (FaceAnalysis's default 0.5). Nothing is downloaded.

    Returns:
        ``(detector, recognition)``: an :class:`~identity_grpo.rewards.facesim.InsightFaceDetector`
        and an :class:`InsightFaceRecognition`.

    Raises:
        ValueError: naming ``field`` when the folder lacks a detection or a recognition model.
    """
    from insightface.model_zoo import get_model

    from identity_grpo.rewards.facesim import InsightFaceDetector

    models = {}
    for path in sorted(Path(folder).glob("*.onnx")):
        model = get_model(str(path), providers=providers or ["CPUExecutionProvider"])
        if model is not None and model.taskname not in models:
            models[model.taskname] = model
    missing = [task for task in ("detection", "recognition") if task not in models]
    if missing:
        raise ValueError(f"config.{field} = {str(folder)!r} has no insightface {' and no '.join(missing)} model "
                         f"among its .onnx files (found: {sorted(models) or 'none'}); point it at an insightface "
                         "model folder such as buffalo_l (det_10g.onnx, w600k_r50.onnx)")
    return InsightFaceDetector(models["detection"], det_size=det_size, det_thresh=det_thresh), \
        InsightFaceRecognition(models["recognition"])


@dataclass
class OpenS2VFaceSimScores:
    """One video's scores, per reference ``k``: ``arc[k]``, ``cur[k]`` (None without a Cur
    embedder), and ``face_frames``: how many sampled frames had a face (of ``num_frames``)."""

    arc: list[float]
    cur: list[float] | None
    face_frames: int
    num_frames: int


class OpenS2VFaceSim:
    """FaceSim-Arc and FaceSim-Cur by OpenS2V-Eval's protocol (see the module docstring).

    Args:
        detector: largest-first face detector (OpenS2V: insightface at ``det_size`` 320).
        arc_embedder: embeds a face in the image it was found in (OpenS2V: insightface's ArcFace).
        cur_embedder: embeds a face of the unpadded image (:class:`CurricularFaceEmbedder`), or None.
        arc_drop_zeros, cur_drop_zeros: zero handling (defaults as OpenS2V's code; see :func:`opens2v_mean`).
    """

    def __init__(self, detector: FaceDetector, arc_embedder: FaceEmbedder, cur_embedder: FaceEmbedder | None = None,
                 num_frames: int = NUM_FRAMES, arc_drop_zeros: bool = False, cur_drop_zeros: bool = True):
        self.detector = detector
        self.arc_embedder = arc_embedder
        self.cur_embedder = cur_embedder
        self.num_frames = num_frames
        self.arc_drop_zeros = arc_drop_zeros
        self.cur_drop_zeros = cur_drop_zeros

    def embeddings(self, found: FoundFace, original: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        arc = self.arc_embedder.embed(found.image, [found.face])[0]
        cur = None if self.cur_embedder is None else self.cur_embedder.embed(original, [found.original])[0]
        return arc, cur

    def score(self, frames: np.ndarray, references: list[np.ndarray]) -> OpenS2VFaceSimScores:
        """Score RGB uint8 ``(F, H, W, 3)`` frames against RGB uint8 reference images.

        Raises:
            ValueError: naming the reference when a reference image has no face (OpenS2V skips
                the video then; here it is an error so that no video silently drops out).
        """
        reference_embeddings = []
        for k, reference in enumerate(references):
            found = largest_face(self.detector, reference)
            if found is None:
                raise ValueError(f"no face found in reference image {k} (even with grey padding); use a reference "
                                 "in which the face is visible")
            reference_embeddings.append(self.embeddings(found, reference))
        arc: list[list[float | None]] = [[] for _ in references]
        cur: list[list[float | None]] = [[] for _ in references]
        face_frames = 0
        indices = sample_indices(len(frames), self.num_frames)
        for index in indices:
            found = largest_face(self.detector, frames[index])
            face_frames += found is not None
            frame_arc, frame_cur = (None, None) if found is None else self.embeddings(found, frames[index])
            for k, (reference_arc, reference_cur) in enumerate(reference_embeddings):
                arc[k].append(None if found is None else _cosine(reference_arc, frame_arc))
                if self.cur_embedder is not None:
                    cur[k].append(None if found is None else _cosine(reference_cur, frame_cur))
        return OpenS2VFaceSimScores(
            arc=[opens2v_mean(a, self.arc_drop_zeros) for a in arc],
            cur=None if self.cur_embedder is None else [opens2v_mean(c, self.cur_drop_zeros) for c in cur],
            face_frames=face_frames,
            num_frames=len(indices),
        )


# ------------------------------------------------------------------ Motion


def farneback_motion(frames: np.ndarray) -> float:
    """OpenS2V's ``motion_fb`` of RGB uint8 ``(F, H, W, 3)`` frames (every frame; see the module docstring)."""
    import cv2

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"motion needs at least 2 frames, got {frames.shape[0]}")
    height, width = frames.shape[1:3]
    small = (FLOW_WIDTH, int(height * (FLOW_WIDTH / width)))
    # OpenS2V converts decord's RGB frames with BGR2GRAY; kept so numbers match its leaderboard.
    grey = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2GRAY) for frame in frames]
    maps = [
        cv2.resize(cv2.calcOpticalFlowFarneback(previous, current, None, **FARNEBACK), small,
                   interpolation=cv2.INTER_AREA)
        for previous, current in itertools.pairwise(grey)
    ]
    return abs(float(np.mean(np.mean(np.asarray(maps), axis=0))))


# ------------------------------------------------------------------ Aesthetics


@torch.no_grad()
def aesthetic_score(frames: np.ndarray, clip_model, processor, head: torch.nn.Module,
                    num_frames: int | None = NUM_FRAMES) -> float:
    """OpenS2V's ``aes_score``: mean over sampled frames of ``head(normalise(CLIP image embedding))``.

    Args:
        frames: RGB uint8 ``(F, H, W, 3)``.
        clip_model: a transformers ``CLIPVisionModelWithProjection`` (what OpenS2V loads; its
            ``image_embeds``) or a ``CLIPModel`` (``get_image_features``, the same projected embedding).
        processor: its image processor (called with ``images=``).
        head: the LAION MLP (:class:`identity_grpo.rewards.composite.AestheticHead`).
    """
    device = next(head.parameters()).device
    images = [frames[i] for i in sample_indices(len(frames), num_frames)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    if hasattr(clip_model, "get_image_features"):
        embeddings = clip_model.get_image_features(pixel_values=pixels)
        if not isinstance(embeddings, torch.Tensor):  # newer transformers may return a model output
            embeddings = embeddings.pooler_output
    else:  # CLIPVisionModelWithProjection, as OpenS2V loads it
        embeddings = clip_model(pixel_values=pixels).image_embeds
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return float(head.eval()(embeddings).reshape(-1).mean())
