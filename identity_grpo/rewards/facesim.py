"""Face similarity (FaceSim): cosine similarity of face-recognition embeddings between the faces in a
video and its references (FaceSim-Arc with ArcFace, FaceSim-dlib with dlib's embedder).

Two layers:

1. :func:`match_faces`, a pure function on tensors: given the face embeddings found in every frame
   and one embedding per reference face, match each reference to its best face in each frame
   (cosine similarity clipped at 0), skip frames with no face, average over the remaining frames,
   and report per-subject scores, their mean and the worst subject.
2. Backends that find and embed faces: a :class:`FaceDetector` (image -> boxes, keypoints) and a
   :class:`FaceEmbedder` (image + boxes -> embeddings), joined by :class:`FaceSimScorer`.
   ``backend="insightface"`` uses insightface's SCRFD detector and an ArcFace ONNX model run by
   onnxruntime, both from local files named in the config (nothing is downloaded).
   ``backend="dlib"`` (:mod:`identity_grpo.rewards.faces_dlib`) uses dlib's HOG detector, 5-point
   alignment and ResNet embedder, whose weights ship in the ``face_recognition_models`` package, so
   it runs offline with no configuration; its cosines are higher and narrower than ArcFace's (see
   that module) and not comparable with OpenS2V's FaceSim-Arc.
   ``backend="tiny"`` is a deterministic stand-in for tests and offline smoke runs: it finds
   "faces" as bright tiles of a grid and embeds each as its mean colour minus its grey level.
   It does not measure identity.

Each reference is matched to its best face independently (no one-to-one assignment), as the
metric is usually reported: two references may match the same face, which the worst-subject
score exposes when the other person is missing.

Config fields (``config.facesim``, all optional; missing ones take these defaults):

- ``backend`` ("insightface"): ``"insightface"``, ``"dlib"`` or ``"tiny"``.
- ``detector_path`` (""): SCRFD detector ONNX file, e.g. ``buffalo_l/det_10g.onnx``.
- ``embedder_path`` (""): ArcFace ONNX file, e.g. ``buffalo_l/w600k_r50.onnx``.
- ``det_size`` (640): detector input side in pixels.
- ``det_thresh`` (0.5): detector score threshold.
- ``num_frames`` (0 = all): frames sampled uniformly from each video
  (``round(linspace(0, F - 1, n))``).
- ``dlib_models_dir`` ("" = the installed ``face_recognition_models`` package): folder with dlib's
  ``shape_predictor_5_face_landmarks.dat`` and ``dlib_face_recognition_resnet_model_v1.dat``.
- ``dlib_upsample`` (1), ``dlib_threshold`` (0.0): HOG detector upsampling (1 finds faces down to
  about 40 px) and SVM score threshold.
- ``tiny_grid`` (2), ``tiny_threshold`` (0.1): the tiny backend's tile grid and brightness threshold.

The ``facesim`` reward returns ``facesim`` (mean over subjects), ``facesim/min`` (worst subject)
and ``facesim/skipped_frames`` (frames without any face, per video).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from identity_grpo.rewards import RewardInputs, config_field, register

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install insightface onnxruntime (or onnxruntime-gpu), or: pip install 'identity-grpo[facesim]'"


# ------------------------------------------------------------------ pure matching and scoring core


@dataclass
class FaceSimScores:
    """Face similarity of B videos with their K (padded) references.

    Attributes:
        per_subject: ``(B, K)`` float32 in [0, 1]: each reference's best-face cosine similarity,
            averaged over the frames that have a face; 0 for padded references and for videos
            with no face at all.
        subject_mask: ``(B, K)`` bool, True for real references.
        mean: ``(B,)`` mean of ``per_subject`` over the real references.
        min: ``(B,)`` minimum of ``per_subject`` over the real references (the worst subject).
        skipped_frames: ``(B,)`` int64, frames in which no face was found (left out of the average).
        num_frames: ``(B,)`` int64, frames looked at.
    """

    per_subject: torch.Tensor
    subject_mask: torch.Tensor
    mean: torch.Tensor
    min: torch.Tensor
    skipped_frames: torch.Tensor
    num_frames: torch.Tensor


def match_faces(
    face_embeddings: torch.Tensor,
    face_mask: torch.Tensor,
    reference_embeddings: torch.Tensor,
    reference_mask: torch.Tensor,
) -> FaceSimScores:
    """Match every reference to its best face in each frame and average over frames.

    ``sim[b, f, k] = max_m max(0, cos(face[b, f, m], ref[b, k]))`` over the real faces ``m`` of
    frame ``f``; frames with no face are skipped; ``per_subject[b, k]`` is the mean of
    ``sim[b, :, k]`` over the kept frames (0 if none is kept).

    Args:
        face_embeddings: ``(B, F, M, D)`` embeddings of up to M faces per frame (padded).
        face_mask: ``(B, F, M)`` bool, True for real faces.
        reference_embeddings: ``(B, K, D)`` one embedding per reference face (padded).
        reference_mask: ``(B, K)`` bool, True for real references; every video needs at least one.

    Returns:
        :class:`FaceSimScores` (computed in float32; embeddings need not be normalised).

    Raises:
        ValueError: on mismatched shapes, a video without references, or non-finite embeddings.
    """
    if face_embeddings.ndim != 4 or face_mask.shape != face_embeddings.shape[:3]:
        raise ValueError(
            f"face_embeddings must be (B, F, M, D) with face_mask (B, F, M); got "
            f"{tuple(face_embeddings.shape)} and {tuple(face_mask.shape)}"
        )
    batch, _, _, dim = face_embeddings.shape
    if reference_embeddings.ndim != 3 or reference_embeddings.shape[0] != batch or reference_embeddings.shape[2] != dim:
        raise ValueError(f"reference_embeddings must be (B={batch}, K, D={dim}), got {tuple(reference_embeddings.shape)}")
    if reference_mask.shape != reference_embeddings.shape[:2]:
        raise ValueError(f"reference_mask must be {tuple(reference_embeddings.shape[:2])}, got {tuple(reference_mask.shape)}")
    no_reference = (~reference_mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if no_reference:
        raise ValueError(f"videos {no_reference} have no reference face embedding")
    faces = face_embeddings.float()
    references = reference_embeddings.float()
    if not (bool(torch.isfinite(faces).all()) and bool(torch.isfinite(references).all())):
        raise ValueError("face or reference embeddings contain NaN/inf; check the face embedder")
    face_mask = face_mask.bool()
    reference_mask = reference_mask.bool()

    faces = F.normalize(faces, dim=-1, eps=1e-8)
    references = F.normalize(references, dim=-1, eps=1e-8)
    cosine = torch.einsum("bfmd,bkd->bfkm", faces, references).clamp_min(0.0)  # (B, F, K, M)
    # A padded face must never be the best match; -1 is below every clipped similarity.
    cosine = cosine.masked_fill(~face_mask[:, :, None, :], -1.0)
    best = cosine.amax(dim=-1) if cosine.shape[-1] else cosine.new_full(cosine.shape[:3], -1.0)  # (B, F, K)
    has_face = face_mask.any(dim=-1)  # (B, F)
    kept = has_face.float()[:, :, None]
    kept_frames = has_face.sum(dim=1)  # (B,)
    per_subject = (best.clamp_min(0.0) * kept).sum(dim=1) / kept_frames.clamp_min(1)[:, None].float()
    per_subject = per_subject.masked_fill(~reference_mask, 0.0)
    count = reference_mask.sum(dim=1).float()
    mean = per_subject.sum(dim=1) / count
    minimum = per_subject.masked_fill(~reference_mask, torch.inf).amin(dim=1)
    num_frames = torch.full((batch,), face_mask.shape[1], dtype=torch.int64)
    return FaceSimScores(
        per_subject=per_subject,
        subject_mask=reference_mask,
        mean=mean,
        min=minimum,
        skipped_frames=num_frames - kept_frames.cpu().long(),
        num_frames=num_frames,
    )


def pad_embeddings(rows: list[list[torch.Tensor]], dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged per-(video, slot) embeddings into a padded tensor and its mask.

    Args:
        rows: ``rows[b][s]`` is an ``(N_bs, D)`` tensor (``N_bs`` may be 0).
        dim: ``D``; needed only when no row holds an embedding (e.g. no face in any frame).

    Returns:
        ``(B, S, M, D)`` float32 embeddings (zeros where padded) and ``(B, S, M)`` bool mask, with
        ``S = max_b len(rows[b])`` and ``M = max N_bs`` (at least 1, so the shapes stay valid).
    """
    dims = {int(e.shape[-1]) for row in rows for e in row if e.numel()} | ({dim} if dim else set())
    if len(dims) > 1:
        raise ValueError(f"embeddings of different sizes {sorted(dims)}; use one embedder")
    dim = dims.pop() if dims else 1
    slots = max((len(row) for row in rows), default=0)
    most = max((int(e.shape[0]) for row in rows for e in row), default=0)
    out = torch.zeros(len(rows), slots, max(most, 1), dim)
    mask = torch.zeros(len(rows), slots, max(most, 1), dtype=torch.bool)
    for b, row in enumerate(rows):
        for s, embeddings in enumerate(row):
            n = int(embeddings.shape[0])
            if n:
                out[b, s, :n] = embeddings.float().reshape(n, dim)
                mask[b, s, :n] = True
    return out, mask


def frame_indices(total: int, num_frames: int) -> list[int]:
    """``round(linspace(0, total - 1, n))`` (all frames when ``num_frames`` is 0 or >= total)."""
    if num_frames <= 0 or num_frames >= total:
        return list(range(total))
    return np.round(np.linspace(0, total - 1, num_frames)).astype(int).tolist()


# ------------------------------------------------------------------ detector / embedder backends


@dataclass
class DetectedFace:
    """One face in an image: ``box`` (x0, y0, x1, y1) in pixels, detector ``score``, and the
    five ArcFace alignment keypoints ``(5, 2)`` when the detector gives them."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class FaceDetector(Protocol):
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 ``(H, W, 3)`` image, largest first."""


class FaceEmbedder(Protocol):
    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        """``(N, D)`` embeddings of ``faces`` in the RGB uint8 ``(H, W, 3)`` image."""

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        """The RGB uint8 face crops the embedder sees (aligned where it aligns); used by the
        copy-paste diagnostic (:mod:`identity_grpo.rewards.copy_paste`)."""


def crop_face(image: np.ndarray, face: DetectedFace, size: int) -> np.ndarray:
    """The face as an RGB uint8 ``(size, size, 3)`` crop: aligned with the five keypoints when
    present (insightface's ``norm_crop``, the ArcFace template), else its box resized."""
    if face.keypoints is not None:
        from insightface.utils import face_align

        return face_align.norm_crop(np.ascontiguousarray(image), np.asarray(face.keypoints, dtype=np.float32), size)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = face.box
    x0, y0 = int(np.clip(np.floor(x0), 0, width - 1)), int(np.clip(np.floor(y0), 0, height - 1))
    x1, y1 = int(np.clip(np.ceil(x1), x0 + 1, width)), int(np.clip(np.ceil(y1), y0 + 1, height))
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


class TileFaceDetector:
    """Tiny deterministic detector for tests: the image is cut into ``grid x grid`` tiles and every
    tile whose mean brightness (in [0, 1]) exceeds ``threshold`` is one "face" (its box is the
    tile). Not a face detector."""

    def __init__(self, grid: int = 2, threshold: float = 0.1):
        self.grid = grid
        self.threshold = threshold

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        height, width = image.shape[:2]
        ys = np.linspace(0, height, self.grid + 1).round().astype(int)
        xs = np.linspace(0, width, self.grid + 1).round().astype(int)
        faces = []
        for row in range(self.grid):
            for col in range(self.grid):
                tile = image[ys[row]:ys[row + 1], xs[col]:xs[col + 1]]
                brightness = float(tile.mean()) / 255.0 if tile.size else 0.0
                if brightness > self.threshold:
                    faces.append(DetectedFace((xs[col], ys[row], xs[col + 1], ys[row + 1]), brightness))
        return sorted(faces, key=lambda face: (-face.area, -face.score))


class MeanColorEmbedder:
    """Tiny deterministic embedder for tests: a face's mean RGB colour (in [0, 1]) minus its grey
    level, a 3-vector. Equal colours give cosine 1; pure red vs pure blue gives -0.5. Not an
    identity model."""

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        """Each face's box resized to 16x16 (no alignment: the tiny detector has no keypoints)."""
        return [crop_face(image, face, 16) for face in faces]

    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        rows = []
        for face in faces:
            x0, y0, x1, y1 = (int(v) for v in face.box)
            colour = torch.from_numpy(image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32) / 255.0).mean(0)
            rows.append(colour - colour.mean())
        return torch.stack(rows) if rows else torch.zeros(0, 3)


class OnnxArcFaceEmbedder:
    """ArcFace-family embedder run by onnxruntime: crops (aligned with keypoints when given) of
    ``input_size`` pixels, RGB, ``(x - 127.5) / 127.5``, NCHW, as insightface's ArcFaceONNX feeds
    the buffalo models."""

    def __init__(self, path: str | Path, providers: list[str | tuple[str, dict]] | None = None, input_size: int = 112):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(f"the facesim embedder needs onnxruntime: {INSTALL_HINT}") from error
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_size = input_size

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        """The embedder's input crops: RGB uint8, aligned on the five keypoints when given."""
        return [crop_face(image, face, self.input_size) for face in faces]

    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        if not faces:
            return torch.zeros(0, self.session.get_outputs()[0].shape[-1] or 1)
        crops = np.stack(self.crops(image, faces)).astype(np.float32)
        blob = ((crops - 127.5) / 127.5).transpose(0, 3, 1, 2)
        (embeddings,) = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})[:1]
        return torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).reshape(len(faces), -1)


def onnx_providers(device: torch.device | str) -> list[str | tuple[str, dict]]:
    """onnxruntime providers for ``device``: each rank's session on its own GPU (onnxruntime would
    otherwise put every rank on GPU 0), the CPU as fallback."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": device.index if device.index is not None else 0}),
            "CPUExecutionProvider"]


class InsightFaceDetector:
    """insightface's SCRFD detector (e.g. ``buffalo_l/det_10g.onnx``) via onnxruntime.

    Args:
        path: the ONNX file, or a detection model insightface's ``model_zoo.get_model`` already loaded.
    """

    def __init__(self, path, providers: list[str | tuple[str, dict]] | None = None, det_size: int = 640,
                 det_thresh: float = 0.5):
        if isinstance(path, (str, Path)):
            try:
                from insightface.model_zoo import get_model
            except ImportError as error:
                raise ImportError(f"facesim backend 'insightface' needs insightface and onnxruntime: {INSTALL_HINT}") from error
            self.model = get_model(str(path), providers=providers or ["CPUExecutionProvider"])
        else:
            self.model = path
        if self.model is None or self.model.taskname != "detection":
            raise ValueError(f"{path} is not an insightface detection model; set config.facesim.detector_path to e.g. "
                             "buffalo_l/det_10g.onnx")
        self.model.prepare(ctx_id=0, input_size=(det_size, det_size), det_thresh=det_thresh)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        # insightface models take BGR (cv2) images and swap to RGB themselves.
        boxes, keypoints = self.model.detect(np.ascontiguousarray(image[..., ::-1]), max_num=0)
        faces = [
            DetectedFace(tuple(float(v) for v in box[:4]), float(box[4]), None if keypoints is None else keypoints[i])
            for i, box in enumerate(boxes)
        ]
        return sorted(faces, key=lambda face: -face.area)


class FaceSimScorer:
    """Detect, embed and match: scores in-memory videos against their reference images."""

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, num_frames: int = 0,
                 metric_name: str = "FaceSim-Arc"):
        self.detector = detector
        self.embedder = embedder
        self.num_frames = num_frames
        # The column prefix for evaluation tables: "FaceSim-Arc" only for ArcFace embeddings.
        self.metric_name = metric_name

    @classmethod
    def from_config(cls, config, device: torch.device | str = "cpu") -> FaceSimScorer:
        """Build the backend named by ``config.facesim.backend`` (see the module docstring)."""
        options = config_field(config, "facesim", None)
        backend = config_field(options, "backend", "insightface")
        num_frames = int(config_field(options, "num_frames", 0))
        if backend == "tiny":
            detector = TileFaceDetector(int(config_field(options, "tiny_grid", 2)),
                                        float(config_field(options, "tiny_threshold", 0.1)))
            return cls(detector, MeanColorEmbedder(), num_frames, "FaceSim-tiny")
        if backend == "dlib":
            from identity_grpo.rewards.faces_dlib import DlibFaceDetector, DlibFaceEmbedder

            detector = DlibFaceDetector(int(config_field(options, "dlib_upsample", 1)),
                                        float(config_field(options, "dlib_threshold", 0.0)))
            embedder = DlibFaceEmbedder.from_models_dir(str(config_field(options, "dlib_models_dir", "")))
            return cls(detector, embedder, num_frames, "FaceSim-dlib")
        if backend != "insightface":
            raise ValueError(f"config.facesim.backend must be 'insightface', 'dlib' or 'tiny', got {backend!r}")
        paths = {}
        for field, example in (("detector_path", "det_10g.onnx"), ("embedder_path", "w600k_r50.onnx")):
            path = str(config_field(options, field, ""))
            if not path:
                raise ValueError(f"config.facesim.{field} is empty; set it to a local insightface model file "
                                 f"(e.g. .../models/buffalo_l/{example}); weights are never downloaded at run time")
            if not Path(path).is_file():
                raise FileNotFoundError(f"config.facesim.{field} = {path!r} does not exist; point it at a local "
                                        f"{example} (insightface's buffalo_l pack)")
            paths[field] = path
        providers = onnx_providers(device)
        detector = InsightFaceDetector(paths["detector_path"], providers, int(config_field(options, "det_size", 640)),
                                       float(config_field(options, "det_thresh", 0.5)))
        return cls(detector, OnnxArcFaceEmbedder(paths["embedder_path"], providers), num_frames)

    def faces(self, image: np.ndarray) -> torch.Tensor:
        """``(N, D)`` embeddings of every face in an RGB uint8 ``(H, W, 3)`` image, largest first."""
        return self.embedder.embed(image, self.detector.detect(image))

    def reference_embeddings(self, references: list[list[Image.Image]]) -> list[list[torch.Tensor]]:
        """Per video, per reference image, the ``(1, D)`` embedding of its largest face.

        Raises:
            ValueError: naming the video and reference when a reference image has no face.
        """
        rows = []
        for b, images in enumerate(references):
            row = []
            for k, image in enumerate(images):
                embeddings = self.faces(np.asarray(image.convert("RGB")))
                if embeddings.shape[0] == 0:
                    raise ValueError(f"no face found in reference image {k} of video {b}; use a reference in which "
                                     "the face is visible (or lower config.facesim.det_thresh)")
                row.append(embeddings[:1])
            rows.append(row)
        return rows

    def score(self, frames: torch.Tensor, references: list[list[Image.Image]]) -> FaceSimScores:
        """Score ``(B, F, H, W, 3)`` uint8 frames against each video's reference images."""
        if frames.dtype != torch.uint8 or frames.ndim != 5:
            raise ValueError(f"frames must be uint8 (B, F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        if len(references) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} videos but {len(references)} reference lists")
        indices = frame_indices(frames.shape[1], self.num_frames)
        video = frames[:, indices].cpu().numpy()
        reference_embeddings, reference_mask = pad_embeddings(self.reference_embeddings(references))
        face_rows = [[self.faces(frame) for frame in clip] for clip in video]
        face_embeddings, face_mask = pad_embeddings(face_rows, dim=reference_embeddings.shape[-1])
        return match_faces(face_embeddings, face_mask, reference_embeddings[:, :, 0], reference_mask[:, :, 0])


def backend_configured(config) -> bool:
    """Whether ``config.facesim`` can build a scorer without more settings: the tiny or dlib backend,
    or insightface with an embedder file named (evaluation scripts skip FaceSim otherwise)."""
    options = config_field(config, "facesim", None)
    backend = config_field(options, "backend", "insightface")
    return backend in ("tiny", "dlib") or bool(config_field(options, "embedder_path", ""))


def facesim_columns(scores: FaceSimScores, prefix: str = "FaceSim-Arc") -> list[dict[str, float]]:
    """Per video, the evaluation columns ``<prefix>`` (mean over subjects), ``/min``,
    ``/subject_<k>`` for each real reference, and ``/skipped_frames``; pass
    ``FaceSimScorer.metric_name`` as ``prefix`` so dlib scores are not labelled FaceSim-Arc."""
    rows = []
    for b in range(scores.mean.shape[0]):
        row = {prefix: float(scores.mean[b]), f"{prefix}/min": float(scores.min[b]),
               f"{prefix}/skipped_frames": int(scores.skipped_frames[b])}
        for k in scores.subject_mask[b].nonzero().flatten().tolist():
            row[f"{prefix}/subject_{k}"] = float(scores.per_subject[b, k])
        rows.append(row)
    return rows


@register("facesim")
def facesim(config, device: torch.device):
    """Factory: build the face backend once; the fn returns ``facesim``, ``facesim/min``,
    ``facesim/skipped_frames`` as ``(B,)`` tensors."""
    scorer = FaceSimScorer.from_config(config, device)
    # The GRPO loop scores in a worker thread; onnxruntime sessions are shared, so calls are serialised.
    lock = threading.Lock()

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        with lock:
            scores = scorer.score(inputs.frames, inputs.reference_images)
        skipped = int(scores.skipped_frames.sum())
        if skipped:
            logger.info("facesim: %d of %d frames had no face and were skipped", skipped, int(scores.num_frames.sum()))
        return {
            "facesim": scores.mean,
            "facesim/min": scores.min,
            "facesim/skipped_frames": scores.skipped_frames.float(),
        }

    return fn
