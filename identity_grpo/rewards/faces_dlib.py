"""dlib face backend for FaceSim: real face detection and identity embeddings that work offline.

The weights ship inside the ``face_recognition_models`` package (an sdist on the package
registry), so nothing is downloaded at run time:

- detection: dlib's HOG + linear SVM frontal face detector (``get_frontal_face_detector``);
- alignment: the 5-point shape predictor (``shape_predictor_5_face_landmarks.dat``, eye corners
  and the bottom of the nose) and ``dlib.get_face_chip`` (150x150, padding 0.25, the crop dlib's
  embedder was trained on);
- embedding: dlib's ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1.dat``,
  128-D, 99.38 % on LFW).

FaceSim uses the **cosine** of two descriptors (so :func:`identity_grpo.rewards.facesim.match_faces`
serves every backend). dlib's own rule is Euclidean: same person when ``||a - b|| < 0.6``. Its
descriptors are not unit-norm (about 1.45 on real photos), and
``||a - b||^2 = |a|^2 + |b|^2 - 2 |a| |b| cos``, so with both norms near 1.45 the 0.6 threshold is
``cos > 1 - 0.36 / (2 * 1.45^2) ~= 0.914``. Measured on real photos (tests/test_faces_real.py):
one face against its mirror image 0.99, a mirrored portrait against the same person in a half-size
group photo 0.977-0.992, different people 0.79-0.92 (one pair of strangers above 0.914, so the
threshold is a guide, not a guarantee). The range is narrow and high;
dlib cosines are not comparable with ArcFace's (same person there is about 0.4-0.8, strangers
about 0-0.2), and as a reward they want a normalisation such as EvoID's ``ranges`` (0.8, 1.0).

Install: ``pip install 'identity-grpo[faces]'`` (``dlib-bin``, ``face_recognition_models``, OpenCV).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from identity_grpo.rewards.facesim import DetectedFace

INSTALL_HINT = "pip install dlib-bin face_recognition_models, or: pip install 'identity-grpo[faces]'"
MODEL_FILES = {
    "shape_predictor": "shape_predictor_5_face_landmarks.dat",
    "embedder": "dlib_face_recognition_resnet_model_v1.dat",
}
CHIP_SIZE, CHIP_PADDING = 150, 0.25


def _import_dlib():
    try:
        import dlib
    except ImportError as error:
        raise ImportError(f"facesim backend 'dlib' needs dlib: {INSTALL_HINT}") from error
    return dlib


def default_models_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models`` package.

    Found without importing the package: its ``__init__`` imports ``pkg_resources``, which recent
    setuptools no longer ship.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"facesim backend 'dlib' needs the face_recognition_models package (dlib's weights): "
                          f"{INSTALL_HINT}; or set config.facesim.dlib_models_dir to a folder holding "
                          f"{sorted(MODEL_FILES.values())}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_paths(models_dir: str | Path = "") -> dict[str, Path]:
    """Paths of the shape predictor and embedder in ``models_dir`` (default: the package's folder)."""
    folder = Path(models_dir) if models_dir else default_models_dir()
    paths = {role: folder / name for role, name in MODEL_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"dlib model files {missing} do not exist; set config.facesim.dlib_models_dir to a "
                                f"folder holding {sorted(MODEL_FILES.values())} ({INSTALL_HINT})")
    return paths


def to_rectangle(face: DetectedFace):
    """A dlib rectangle for a ``(x0, y0, x1, y1)`` box (dlib's right and bottom are inclusive)."""
    dlib = _import_dlib()
    x0, y0, x1, y1 = face.box
    return dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)


class DlibFaceDetector:
    """dlib's HOG frontal face detector.

    Args:
        upsample: times the image is doubled before detecting; HOG finds faces of about 80 px and
            up, so 1 (the face_recognition library's default) also finds faces of about 40 px at
            about 4x the cost.
        threshold: SVM score above which a window is a face (dlib's default 0; raise it to
            drop false positives, lower it to find more faces).
    """

    def __init__(self, upsample: int = 1, threshold: float = 0.0):
        self.detector = _import_dlib().get_frontal_face_detector()
        self.upsample = int(upsample)
        self.threshold = float(threshold)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        rectangles, scores, _ = self.detector.run(np.ascontiguousarray(image), self.upsample, self.threshold)
        faces = [
            DetectedFace((float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1)), float(score))
            for r, score in zip(rectangles, scores)
        ]
        return sorted(faces, key=lambda face: (-face.area, -face.score))


class DlibFaceEmbedder:
    """dlib's ResNet embedder on 5-point aligned 150x150 chips (landmarks found inside each box, so
    boxes from any detector work)."""

    def __init__(self, shape_predictor_path: str | Path, embedder_path: str | Path):
        dlib = _import_dlib()
        self.shape_predictor = dlib.shape_predictor(str(shape_predictor_path))
        self.model = dlib.face_recognition_model_v1(str(embedder_path))

    @classmethod
    def from_models_dir(cls, models_dir: str | Path = "") -> DlibFaceEmbedder:
        paths = model_paths(models_dir)
        return cls(paths["shape_predictor"], paths["embedder"])

    def crops(self, image: np.ndarray, faces: list[DetectedFace]) -> list[np.ndarray]:
        """Aligned RGB uint8 ``(150, 150, 3)`` chips: eyes and nose moved to fixed positions, so
        position, scale and in-plane rotation are removed; pose, expression and pixels are not."""
        dlib = _import_dlib()
        image = np.ascontiguousarray(image)
        return [
            dlib.get_face_chip(image, self.shape_predictor(image, to_rectangle(face)), CHIP_SIZE, CHIP_PADDING)
            for face in faces
        ]

    def embed(self, image: np.ndarray, faces: list[DetectedFace]) -> torch.Tensor:
        if not faces:
            return torch.zeros(0, 128)
        descriptors = self.model.compute_face_descriptor(self.crops(image, faces))
        return torch.tensor(np.asarray([np.asarray(d) for d in descriptors]), dtype=torch.float32)
