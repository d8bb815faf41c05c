"""Copy-paste diagnostic: how close the generated faces are to the reference face *image*, not identity.

An identity reward alone teaches a model to paste the reference face (EvoID's "copy-paste
effect"; users of peer frameworks report it with ArcFace rewards). FaceSim cannot tell a pasted
face from a good new rendering of the same person; this score can: it compares pixels.

For each reference and each sampled frame, every detected face is cropped the way the FaceSim
backend's embedder crops it (dlib: 5-point aligned 150x150 chip; insightface: 112x112 ArcFace
alignment; tiny: the box), converted to grey, resized to ``size x size`` (``cv2.INTER_AREA``) and
compared with the reference crop by normalised cross-correlation
``ncc = <a - mean(a), b - mean(b)> / (||a - mean(a)|| ||b - mean(b)||)``. The alignment removes
position, scale and in-plane rotation, and NCC removes brightness and contrast, so what is left is
pose, expression, lighting direction and texture: a pasted face (resized, moved, re-lit) scores
about 1; the same person in another pose or photo scores far lower. Measured with dlib on the
astronaut photo (tests/test_faces_real.py): pasted (resized, moved) 0.99, the same face mirrored
0.29, the best of six other people 0.30, while dlib FaceSim gives 0.98, 0.98 and 0.90.

The per-frame score of a reference is its best face (``max`` over faces of ``max(0, ncc)``),
averaged over frames that have a face, exactly as FaceSim's matching
(:func:`identity_grpo.rewards.facesim.match_faces`, with the centred grey crop as the
"embedding"). Keys: ``copy_paste`` (mean over subjects) and ``copy_paste/max`` (the most pasted
subject). Log it next to ``facesim``: FaceSim rising with copy-paste flat is learning, both rising
together is pasting. It is a diagnostic; give it weight 0 in ``config.reward_fn`` (or a negative
weight to penalise pasting).

Config: the ``config.facesim`` backend and ``num_frames``; ``config.copy_paste.size`` (32).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from identity_grpo.rewards import RewardInputs, config_field, register
from identity_grpo.rewards.facesim import DetectedFace, FaceEmbedder, FaceSimScorer, FaceSimScores


def grey_vector(crop: np.ndarray, size: int) -> torch.Tensor:
    """An RGB uint8 crop as a centred, unit-norm grey ``(size * size,)`` vector (zeros if flat), so
    that the dot product of two is their normalised cross-correlation."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).reshape(-1)
    grey -= grey.mean()
    norm = float(np.linalg.norm(grey))
    return torch.from_numpy(grey / norm if norm > 1e-6 else np.zeros_like(grey))


class PixelCropEmbedder:
    """A :class:`FaceEmbedder` whose "embedding" is the centred grey crop of another embedder."""

    def __init__(self, embedder: FaceEmbedder, size: int = 32):
        if not hasattr(embedder, "crops"):
            raise TypeError(f"{type(embedder).__name__} has no crops(image, faces); the copy-paste score needs the "
                            "face crops a FaceSim embedder sees")
        self.embedder = embedder
        self.size = int(size)

    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        crops = self.embedder.crops(image, faces)
        if not crops:
            return torch.zeros(0, self.size * self.size)
        return torch.stack([grey_vector(crop, self.size) for crop in crops])


def copy_paste_scorer(scorer: FaceSimScorer, size: int = 32) -> FaceSimScorer:
    """A scorer with ``scorer``'s detector and frame sampling that scores copy-paste instead of identity."""
    return FaceSimScorer(scorer.detector, PixelCropEmbedder(scorer.embedder, size), scorer.num_frames, "CopyPaste")


def copy_paste_columns(scores: FaceSimScores) -> list[dict[str, float]]:
    """Per video: ``CopyPaste`` (mean over subjects), ``CopyPaste/max``, ``CopyPaste/subject_<k>``."""
    rows = []
    for b in range(scores.mean.shape[0]):
        subjects = scores.subject_mask[b].nonzero().flatten().tolist()
        per_subject = {f"CopyPaste/subject_{k}": float(scores.per_subject[b, k]) for k in subjects}
        row = {"CopyPaste": float(scores.mean[b]), "CopyPaste/max": max(per_subject.values()), **per_subject}
        rows.append(row)
    return rows


@register("copy_paste")
def copy_paste(config, device: torch.device):
    """Factory: the ``config.facesim`` backend's detector and crops; returns ``copy_paste`` and
    ``copy_paste/max`` as ``(B,)`` tensors."""
    size = int(config_field(config_field(config, "copy_paste", None), "size", 32))
    scorer = copy_paste_scorer(FaceSimScorer.from_config(config, device), size)
    lock = threading.Lock()  # the detector and embedder sessions are shared with the scoring thread

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        with lock:
            scores = scorer.score(inputs.frames, inputs.reference_images)
        most_pasted = scores.per_subject.masked_fill(~scores.subject_mask, 0.0).amax(dim=1)
        return {"copy_paste": scores.mean, "copy_paste/max": most_pasted}

    return fn
