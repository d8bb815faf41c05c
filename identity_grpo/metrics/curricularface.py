"""CurricularFace's IR backbone (IR-101 for OpenS2V-Eval's FaceSim-Cur), our own code.

OpenS2V-Eval (PKU-YuanGroup/OpenS2V-Nexus, ``eval/get_facesim.py``) builds
``get_model("IR_101")([112, 112])`` from ``eval/utils/curricularface`` -- a copy of TFace's
``recognition/torchkit/backbone/model_irse.py`` (Tencent/TFace) -- and loads
``glint360k_curricular_face_r101_backbone.bin`` into it with ``load_state_dict`` (strict). This
module builds the same network with the same parameter names, so that file loads here with
``strict=True`` too. The names come from that code, which fixes them:

- ``input_layer``: ``0`` conv 3x3 (3 -> 64, no bias), ``1`` BatchNorm2d, ``2`` PReLU.
- ``body.<i>``: the units of the four stages, numbered on (IR-101: 3, 13, 30, 3 units of widths
  64, 128, 256, 512; the first unit of each stage has stride 2, so 112 -> 56 -> 28 -> 14 -> 7).
  Each unit adds ``res_layer`` -- ``0`` BatchNorm2d(in), ``1`` conv 3x3 (in -> out), ``2``
  BatchNorm2d(out), ``3`` PReLU(out), ``4`` conv 3x3 (out -> out, the unit's stride), ``5``
  BatchNorm2d(out) -- to ``shortcut_layer``: a 1x1 max-pool of the stride (no parameters) when
  in == out, else ``0`` conv 1x1 with the stride and ``1`` BatchNorm2d.
- ``output_layer``: ``0`` BatchNorm2d(512), ``1`` Dropout(0.4), ``2`` Flatten, ``3`` Linear
  (512 * 7 * 7 -> 512), ``4`` BatchNorm1d(512) without affine parameters (running statistics only).

TFace's unit differs from the one in the CurricularFace authors' repository
(HuangYG123/CurricularFace, ``backbone/model_irse.py``), which has no BatchNorm between the first
conv and the PReLU: a checkpoint of one does not load into the other. The released glint360k file
is TFace's.

:meth:`IRBackbone.from_state_dict` reads the layout back from a state dict (units per stage from
where the conv shortcuts are, widths from the conv shapes), so a smaller network of the same
family -- the tiny stand-ins of the tests -- loads from a file the same way as IR-101.
:meth:`IRBackbone.is_ir101` says whether a loaded network is OpenS2V's.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

IR101_UNITS = (3, 13, 30, 3)
IR101_WIDTHS = (64, 128, 256, 512)
EMBEDDING_DIM = 512
INPUT_SIZE = 112


class IRUnit(nn.Module):
    """One residual unit: ``res_layer(x) + shortcut_layer(x)`` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """The IR face-recognition backbone: ``(N, 3, S, S)`` in ``[-1, 1]`` -> ``(N, embedding_dim)``
    (not normalised; OpenS2V L2-normalises it).

    Args:
        units: units per stage (IR-101: ``(3, 13, 30, 3)``).
        widths: channels per stage (IR-101: ``(64, 128, 256, 512)``); the stem has ``widths[0]``.
        embedding_dim: output size (512).
        input_size: input side ``S``, a multiple of 16 (112: the flattened map is 7 x 7).
    """

    def __init__(self, units: tuple[int, ...] = IR101_UNITS, widths: tuple[int, ...] = IR101_WIDTHS,
                 embedding_dim: int = EMBEDDING_DIM, input_size: int = INPUT_SIZE):
        super().__init__()
        if len(units) != len(widths) or not units or min(units) < 1:
            raise ValueError(f"units {units} and widths {widths} must be one positive count and width per stage")
        if input_size % (2 ** len(units)):
            raise ValueError(f"input_size {input_size} must be divisible by {2 ** len(units)} (one stride 2 per stage)")
        self.units, self.widths = tuple(units), tuple(widths)
        self.input_size = input_size
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                         nn.PReLU(widths[0]))
        layers, channels = [], widths[0]
        for count, width in zip(units, widths):
            for index in range(count):
                layers.append(IRUnit(channels, width, 2 if index == 0 else 1))
                channels = width
        self.body = nn.Sequential(*layers)
        side = input_size // 2 ** len(units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(channels), nn.Dropout(0.4), nn.Flatten(),
            nn.Linear(channels * side * side, embedding_dim), nn.BatchNorm1d(embedding_dim, affine=False),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(pixels)))

    @property
    def is_ir101(self) -> bool:
        """Whether this is OpenS2V's IR-101 layout (112 px input, 512-D output)."""
        return (self.units, self.widths, self.output_layer[3].out_features, self.input_size) == (
            IR101_UNITS, IR101_WIDTHS, EMBEDDING_DIM, INPUT_SIZE)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> IRBackbone:
        """The network whose layout the state dict describes, with its weights loaded (``strict=True``).

        A stage starts at unit 0 and at every unit with a conv shortcut (the width changes there);
        a stage whose width equals the previous one's cannot be told apart, so such layouts read
        back merged (TFace's IR networks have none).

        Raises:
            ValueError: when the keys are not an IR backbone's, or the strict load fails.
        """
        unit_numbers = sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"body\.(\d+)\.", key))})
        required = ("input_layer.0.weight", "output_layer.3.weight")
        if not unit_numbers or unit_numbers != list(range(len(unit_numbers))) or any(k not in state_dict for k in required):
            raise ValueError("not an IR backbone state dict (expected input_layer.*, body.<i>.*, output_layer.* keys "
                             "as in TFace's model_irse)")
        starts = [i for i in unit_numbers if i == 0 or f"body.{i}.shortcut_layer.0.weight" in state_dict]
        units = tuple(end - start for start, end in zip(starts, [*starts[1:], len(unit_numbers)]))
        widths = tuple(int(state_dict[f"body.{start}.res_layer.1.weight"].shape[0]) for start in starts)
        linear = state_dict["output_layer.3.weight"]
        side = round((linear.shape[1] / widths[-1]) ** 0.5)
        model = cls(units, widths, int(linear.shape[0]), side * 2 ** len(units))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            expected = model.state_dict()
            problems = [f"missing {key}" for key in expected if key not in state_dict]
            problems += [f"unexpected {key}" for key in state_dict if key not in expected]
            problems += [f"{key} has shape {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}"
                         for key, value in expected.items() if key in state_dict and state_dict[key].shape != value.shape]
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"the state dict does not fit the IR layout it describes (units {units}, widths "
                             f"{widths}): {'; '.join(problems[:3]) + more if problems else error}") from error
        return model.eval()


def load_ir_backbone(path: str | Path, field: str = "opens2v.curricularface_path") -> IRBackbone:
    """Load an IR backbone state dict file (``torch.load``, CPU, weights only), layout read from it.

    Raises:
        ValueError: naming ``field`` when the file is missing or is not an IR backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config.{field} = {str(path)!r} is not a file; point it at the CurricularFace IR-101 "
                         "weights (glint360k_curricular_face_r101_backbone.bin) or set it to '' to turn it off")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"config.{field} = {str(path)!r} cannot be read as a torch state dict: {error}") from error
    if not isinstance(state_dict, dict):  # a config error like the others: ValueError naming the field
        raise ValueError(  # noqa: TRY004
            f"config.{field} = {str(path)!r} holds a {type(state_dict).__name__}, not a state dict")
    try:
        return IRBackbone.from_state_dict(state_dict)
    except ValueError as error:
        raise ValueError(f"config.{field} = {str(path)!r}: {error}") from error
