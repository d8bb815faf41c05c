"""The OpenS2V-Eval columns of batch inference (``test_wan2_1_vace.py``): the ``config.opens2v``
section, its start-up check, the metrics built from local weights, and one video's columns.

Columns (per video, base and LoRA alike), each on when its weights are configured:

- ``OpenS2V/Motion``: :func:`~identity_grpo.metrics.opens2v.farneback_motion` of every frame
  (``opens2v.motion``; OpenCV only).
- ``OpenS2V/FaceSim-Arc``: :class:`~identity_grpo.metrics.opens2v.OpenS2VFaceSim` with insightface's
  detector (``opens2v.det_size``, 320 in OpenS2V) and recognition model from the model folder
  ``opens2v.face_models_dir``; ``OpenS2V/face_frames``: how many of the sampled frames had a face.
- ``OpenS2V/FaceSim-Cur``: the same faces through CurricularFace
  (:mod:`identity_grpo.metrics.curricularface`, weights ``opens2v.curricularface_path``).
- ``OpenS2V/Aesthetics``: :func:`~identity_grpo.metrics.opens2v.aesthetic_score` with CLIP ViT-L/14
  (``opens2v.clip_path``) and the LAION MLP (``opens2v.aesthetic_head_path``), fp32 as OpenS2V.

OpenS2V scores a video against one human reference (the first of its row whose path says it is
a person); here the reference is the first of the row in which the detector finds a face. A row
with no such reference gets no FaceSim columns (a warning says so) instead of failing the run.

Zero handling (``opens2v.zero_handling``): OpenS2V's code keeps clipped zeros in Arc's mean and
drops them from Cur's (``if arc_scores != 0.0`` compares the list with 0.0, always true). We
follow its code by default (``"opens2v"``), since the point of these columns is to compare with
its numbers; ``"keep"`` or ``"drop"`` treats both alike.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from identity_grpo.metrics.opens2v import (
    NUM_FRAMES,
    CurricularFaceEmbedder,
    OpenS2VFaceSim,
    aesthetic_score,
    farneback_motion,
    largest_face,
    load_face_models,
)
from identity_grpo.rewards import config_field

logger = logging.getLogger(__name__)

PREFIX = "OpenS2V/"
ZERO_HANDLING = {"opens2v": (False, True), "keep": (False, False), "drop": (True, True)}  # (Arc, Cur) drop zeros
FIELDS = {"motion", "face_models_dir", "det_size", "det_thresh", "curricularface_path", "clip_path",
          "aesthetic_head_path", "num_frames", "zero_handling"}


def _field(config, name: str, default):
    return config_field(config_field(config, "opens2v", None), name, default)


def validate_opens2v_config(config) -> None:
    """Check ``config.opens2v`` from the file system and installed packages alone (no model loads).

    Raises:
        ValueError: listing every problem with its ``opens2v.<field>`` and what to do.
    """
    section = config_field(config, "opens2v", None)
    errors = []
    if section is not None:
        unknown = sorted(set(section.keys()) - FIELDS)
        if unknown:
            errors.append(f"opens2v has unknown fields {unknown}; the fields are {sorted(FIELDS)}")

    def path_error(field: str, want_dir: bool, what: str) -> bool:
        path = str(_field(config, field, ""))
        if not path:
            return False
        if not (Path(path).is_dir() if want_dir else Path(path).is_file()):
            errors.append(f"opens2v.{field} = {path!r} is not an existing {'folder' if want_dir else 'file'}: "
                          f"point it at {what}, or set it to '' to turn it off (weights are never downloaded)")
            return False
        return True

    def missing_packages(field: str, packages: dict[str, str]) -> None:
        absent = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
        if absent:
            errors.append(f"opens2v.{field} needs {', '.join(absent)}: pip install {' '.join(absent)} "
                          f"(or pip install 'identity-grpo[facesim,faces]'), or turn it off")

    if _field(config, "motion", True):
        missing_packages("motion", {"cv2": "opencv-python"})
    faces = path_error("face_models_dir", True, "a local insightface model folder (e.g. buffalo_l, OpenS2V's "
                                                "face_extractor/models/buffalo_l) holding a detection and a "
                                                "recognition .onnx file")
    if faces and not any(Path(str(_field(config, "face_models_dir", ""))).glob("*.onnx")):
        errors.append(f"opens2v.face_models_dir = {str(_field(config, 'face_models_dir', ''))!r} holds no .onnx "
                      "file: point it at the insightface model folder itself (e.g. .../models/buffalo_l)")
    if faces:
        missing_packages("face_models_dir", {"insightface": "insightface", "onnxruntime": "onnxruntime",
                                             "cv2": "opencv-python"})
    path_error("curricularface_path", False, "the CurricularFace IR-101 weights "
                                             "(glint360k_curricular_face_r101_backbone.bin)")
    if str(_field(config, "curricularface_path", "")) and not str(_field(config, "face_models_dir", "")):
        errors.append("opens2v.curricularface_path is set but opens2v.face_models_dir is empty: FaceSim-Cur embeds "
                      "the faces insightface's detector finds; set face_models_dir too")
    clip = path_error("clip_path", True, "a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14)")
    head = path_error("aesthetic_head_path", False, "the LAION aesthetic MLP weights (OpenS2V's "
                                                     "aesthetic-model.pth, LAION's sac+logos+ava1-l14-linearMSE.pth)")
    if bool(str(_field(config, "clip_path", ""))) != bool(str(_field(config, "aesthetic_head_path", ""))):
        errors.append("opens2v.clip_path and opens2v.aesthetic_head_path turn Aesthetics on together: set both "
                      "or neither")
    elif clip and head:
        missing_packages("clip_path", {"transformers": "transformers"})
    zero_handling = _field(config, "zero_handling", "opens2v")
    if zero_handling not in ZERO_HANDLING:
        errors.append(f"opens2v.zero_handling ({zero_handling!r}) must be one of {sorted(ZERO_HANDLING)}")
    num_frames, det_size = _field(config, "num_frames", NUM_FRAMES), _field(config, "det_size", 320)
    if not (isinstance(num_frames, int) and num_frames >= 1):
        errors.append(f"opens2v.num_frames ({num_frames!r}) must be an integer >= 1 (OpenS2V: 32)")
    if not (isinstance(det_size, int) and det_size >= 32 and det_size % 32 == 0):
        errors.append(f"opens2v.det_size ({det_size!r}) must be a multiple of 32 (OpenS2V: 320)")
    if not 0 < float(_field(config, "det_thresh", 0.5)) < 1:
        errors.append("opens2v.det_thresh must be in (0, 1) (insightface's default: 0.5)")
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


@dataclass
class Aesthetics:
    """CLIP image model, its processor and the LAION head, for :func:`aesthetic_score`."""

    clip_model: torch.nn.Module
    processor: object
    head: torch.nn.Module

    @classmethod
    def from_paths(cls, clip_path: str, head_path: str, device: torch.device | str = "cpu") -> Aesthetics:
        """Load local files only (``local_files_only``); the head strictly (its keys ``layers.*``)."""
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        from identity_grpo.rewards.composite import AestheticHead

        config = AutoConfig.from_pretrained(clip_path, local_files_only=True)
        if config.model_type == "clip":  # a whole CLIP folder: its vision tower, with the model's projection size
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        clip_model = CLIPVisionModelWithProjection.from_pretrained(clip_path, config=config, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(clip_path, local_files_only=True)
        head = AestheticHead(clip_model.config.projection_dim)
        try:
            head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
        except RuntimeError as error:
            raise ValueError(f"config.opens2v.aesthetic_head_path = {head_path!r} is not a LAION aesthetic MLP for "
                             f"{clip_model.config.projection_dim}-D CLIP embeddings: {str(error).splitlines()[0]}"
                             ) from error
        return cls(clip_model.to(device).eval(), processor, head.to(device).eval())


@dataclass
class OpenS2VMetrics:
    """The OpenS2V-Eval metrics the config turns on (None / False: off)."""

    motion: bool = True
    facesim: OpenS2VFaceSim | None = None
    aesthetics: Aesthetics | None = None
    num_frames: int = NUM_FRAMES

    @classmethod
    def from_config(cls, config, device: torch.device | str = "cpu") -> OpenS2VMetrics:
        """Build from ``config.opens2v`` (run :func:`validate_opens2v_config` first)."""
        from identity_grpo.metrics.curricularface import load_ir_backbone
        from identity_grpo.rewards.facesim import onnx_providers

        num_frames = int(_field(config, "num_frames", NUM_FRAMES))
        facesim = None
        if face_models_dir := str(_field(config, "face_models_dir", "")):
            detector, arc = load_face_models(face_models_dir, onnx_providers(device), int(_field(config, "det_size", 320)),
                                             float(_field(config, "det_thresh", 0.5)))
            cur = None
            if cur_path := str(_field(config, "curricularface_path", "")):
                backbone = load_ir_backbone(cur_path)
                if not backbone.is_ir101:
                    logger.warning("opens2v.curricularface_path holds an IR network with %s units of widths %s, not "
                                   "OpenS2V's IR-101: its OpenS2V/FaceSim-Cur is not comparable with OpenS2V's",
                                   backbone.units, backbone.widths)
                cur = CurricularFaceEmbedder(backbone.to(device), device)
            arc_drop, cur_drop = ZERO_HANDLING[_field(config, "zero_handling", "opens2v")]
            facesim = OpenS2VFaceSim(detector, arc, cur, num_frames, arc_drop_zeros=arc_drop, cur_drop_zeros=cur_drop)
        aesthetics = None
        if clip_path := str(_field(config, "clip_path", "")):
            aesthetics = Aesthetics.from_paths(clip_path, str(_field(config, "aesthetic_head_path", "")), device)
        return cls(bool(_field(config, "motion", True)), facesim, aesthetics, num_frames)

    @property
    def names(self) -> list[str]:
        """The metrics that are on, e.g. ``["Motion", "FaceSim-Arc", "FaceSim-Cur"]``."""
        names = ["Motion"] if self.motion else []
        if self.facesim is not None:
            names += ["FaceSim-Arc"] + (["FaceSim-Cur"] if self.facesim.cur_embedder is not None else [])
        return names + (["Aesthetics"] if self.aesthetics is not None else [])

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def columns(self, frames: np.ndarray, references: list[np.ndarray]) -> dict[str, float]:
        """One video's columns (see the module docstring).

        Args:
            frames: RGB uint8 ``(F, H, W, 3)``.
            references: the row's reference images, RGB uint8 ``(H, W, 3)``.
        """
        row: dict[str, float] = {}
        if self.motion:
            row[PREFIX + "Motion"] = farneback_motion(frames)
        if self.facesim is not None:
            reference = next((r for r in references if largest_face(self.facesim.detector, r) is not None), None)
            if reference is None:
                logger.warning("no face in any of the %d reference images: no OpenS2V FaceSim for this video",
                               len(references))
            else:
                scores = self.facesim.score(frames, [reference])
                row[PREFIX + "FaceSim-Arc"] = scores.arc[0]
                if scores.cur is not None:
                    row[PREFIX + "FaceSim-Cur"] = scores.cur[0]
                row[PREFIX + "face_frames"] = scores.face_frames
        if self.aesthetics is not None:
            row[PREFIX + "Aesthetics"] = aesthetic_score(frames, self.aesthetics.clip_model, self.aesthetics.processor,
                                                         self.aesthetics.head, self.num_frames)
        return row
