"""The tiny world's pictures: cartoon people with an identity, moving over a background.

Everything here is deterministic (a scene is drawn from a ``numpy.random.Generator``; drawing
has no randomness) and cheap (PIL at 4x supersampling, then a box filter).

An identity is (skin tone, hair colour, hair style): 3 x 4 x 2 = 24 people. A video shows one or
two of them, faces about a quarter of the frame wide, moving left, right or standing still over
one of three backgrounds. The prompt names the motion, the background and the people's gender
(hair style) but never a colour, so skin and hair can only come from the references. A reference
is a large centred portrait on a light grey card: another scale and position than in any video,
so pasting the reference is never the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

SKINS = {"pale": (245, 210, 185), "tan": (200, 150, 105), "dark": (115, 75, 50)}
HAIRS = {"black": (25, 20, 20), "blond": (240, 210, 80), "red": (200, 60, 35), "white": (235, 235, 240)}
STYLES = ("short", "long")  # short hair: "a man", long hair: "a woman"
BACKGROUNDS = {"in the park": (70, 140, 60), "by the sea": (60, 110, 190), "at night": (40, 30, 70)}
MOTIONS = {"to the left": -1, "to the right": 1, "still": 0}
EYES = (30, 25, 25)
REFERENCE_CARD = (215, 215, 215)

SUPERSAMPLE = 4
FACE_WIDTH = 0.26  # of the frame width
STEP = 0.06  # of the frame width, per frame, when walking


@dataclass(frozen=True)
class Identity:
    skin: str
    hair: str
    style: str

    @property
    def name(self) -> str:
        return f"{self.skin}_{self.hair}_{self.style}"

    @property
    def noun(self) -> str:
        return "a man" if self.style == "short" else "a woman"


IDENTITIES = tuple(Identity(s, h, y) for s, h, y in product(SKINS, HAIRS, STYLES))
IDENTITY_BY_NAME = {identity.name: identity for identity in IDENTITIES}


@dataclass(frozen=True)
class Scene:
    """One video: people (left to right, the references' order), background, motion, layout.

    ``x0`` are the face centres in the first frame and ``y`` their common height, as fractions of
    the frame; each frame moves every face by ``direction * STEP``.
    """

    people: tuple[Identity, ...]
    background: str
    motion: str
    x0: tuple[float, ...]
    y: float

    @property
    def prompt(self) -> str:
        if self.motion == "still":
            verb = "stands still" if len(self.people) == 1 else "stand still"
        else:
            verb = ("walks " if len(self.people) == 1 else "walk ") + self.motion
        nouns = [person.noun for person in self.people]
        who = {"a man": "two men", "a woman": "two women"}[nouns[0]] if len(set(nouns)) == 1 and len(nouns) == 2 \
            else " and ".join(nouns)
        return f"{who} {verb} {self.background}"

    def centres(self, num_frames: int) -> np.ndarray:
        """``(F, n)`` horizontal face centres per frame, fractions of the width."""
        offsets = np.arange(num_frames)[:, None] * STEP * MOTIONS[self.motion]
        return np.asarray(self.x0)[None, :] + offsets


def sample_scene(rng: np.random.Generator, identities, num_frames: int, max_people: int = 2) -> Scene:
    """A random scene over ``identities`` whose faces stay inside the frame for ``num_frames``."""
    count = int(rng.integers(1, max_people + 1))
    chosen = rng.choice(len(identities), size=count, replace=False)
    people = tuple(identities[i] for i in chosen)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    travel = STEP * (num_frames - 1) * MOTIONS[motion]
    margin = FACE_WIDTH / 2 + 0.02
    # Faces at least one face width apart; the group's span must fit with its travel.
    gap = FACE_WIDTH + 0.08
    span = gap * (count - 1)
    low = margin - min(travel, 0.0)
    high = 1.0 - margin - span - max(travel, 0.0)
    start = float(rng.uniform(low, high))
    x0 = tuple(start + gap * i for i in range(count))
    y = float(rng.uniform(0.42, 0.58))
    return Scene(people, background, motion, x0, y)


def _draw_person(draw: ImageDraw.ImageDraw, identity: Identity, cx: float, cy: float, width: float) -> None:
    """A face of ``width`` pixels centred at (cx, cy), on an (already supersampled) canvas."""
    skin, hair = SKINS[identity.skin], HAIRS[identity.hair]
    w, h = width, width * 1.2
    if identity.style == "long":
        draw.rectangle([cx - 0.75 * w, cy - 0.35 * h, cx + 0.75 * w, cy + 1.0 * h], fill=hair)
    draw.rectangle([cx - 0.18 * w, cy + 0.3 * h, cx + 0.18 * w, cy + 0.8 * h], fill=skin)  # neck
    draw.ellipse([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], fill=skin)
    draw.chord([cx - 0.58 * w, cy - 0.7 * h, cx + 0.58 * w, cy + 0.05 * h], 180, 360, fill=hair)
    for side in (-1, 1):
        ex = cx + side * 0.2 * w
        draw.ellipse([ex - 0.09 * w, cy + 0.02 * h, ex + 0.09 * w, cy + 0.14 * h], fill=EYES)


def render_frame(scene: Scene, frame_index: int, size: int, num_frames: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 frame ``frame_index`` of ``scene``."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    centres = scene.centres(num_frames)[frame_index]
    for person, cx in zip(scene.people, centres):
        _draw_person(draw, person, cx * big, scene.y * big, FACE_WIDTH * big)
    return np.asarray(image.resize((size, size), Image.BOX))


def render_video(scene: Scene, size: int, num_frames: int) -> np.ndarray:
    """``(F, size, size, 3)`` uint8 video of ``scene``."""
    return np.stack([render_frame(scene, index, size, num_frames) for index in range(num_frames)])


def render_reference(identity: Identity, size: int = 64) -> Image.Image:
    """A centred portrait filling most of a ``size`` x ``size`` grey card."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), REFERENCE_CARD)
    _draw_person(ImageDraw.Draw(image), identity, big / 2, big * 0.45, big * 0.55)
    return image.resize((size, size), Image.BOX)
