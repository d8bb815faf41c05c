"""The tiny world's identity check: which of its 24 people a frame shows, from its colours.

Every pixel is assigned to the nearest colour of the world's palette (skins, hairs, backgrounds,
eyes), or to none when no palette colour is within ``max_distance``. A frame's evidence is its
count of pixels of each skin and each hair colour; a person ``j`` is expected to contribute
``E_j`` (its skin count, and a hair count that is larger for long hair), measured once by drawing
that person alone. Each frame's prediction is the person whose ``E`` is nearest (L1) to the
frame's counts, or for two references the ordered pair and column split whose left and right
counts are nearest to theirs: a nearest-identity classifier over all 24 people (552 ordered
pairs). The score of a frame is the fraction of its
references in the predicted set; chance is 1/24 for one person.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from identity_grpo.world.render import (
    BACKGROUNDS,
    EYES,
    HAIRS,
    IDENTITIES,
    SKINS,
    Identity,
    Scene,
    render_frame,
)

_PALETTE = np.array(list(SKINS.values()) + list(HAIRS.values()) + list(BACKGROUNDS.values()) + [EYES], dtype=np.float32)
_NUM_SKINS, _NUM_HAIRS = len(SKINS), len(HAIRS)
MAX_DISTANCE = 60.0


def colour_counts(frames: np.ndarray, max_distance: float = MAX_DISTANCE, per_column: bool = False) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 -> ``(..., 7)`` pixel counts of each skin, then each hair colour
    (``(..., W, 7)``, one row per image column, with ``per_column``)."""
    pixels = frames.astype(np.float32)[..., None, :]  # (..., H, W, 1, 3)
    distance = np.linalg.norm(pixels - _PALETTE, axis=-1)  # (..., H, W, P)
    nearest = distance.argmin(axis=-1)
    close = distance.min(axis=-1) <= max_distance
    counts = [((nearest == k) & close).sum(axis=-2 if per_column else (-1, -2)) for k in range(_NUM_SKINS + _NUM_HAIRS)]
    return np.stack(counts, axis=-1).astype(np.float32)


@lru_cache(maxsize=4)
def expected_counts(size: int) -> np.ndarray:
    """``(24, 7)`` counts each person contributes to a ``size`` x ``size`` frame (drawn alone at
    the centre of each background, averaged)."""
    rows = []
    for identity in IDENTITIES:
        frames = np.stack([render_frame(Scene((identity,), background, "still", (0.5,), 0.5), 0, size, 1)
                           for background in BACKGROUNDS])
        rows.append(colour_counts(frames).mean(axis=0))
    return np.stack(rows)


def candidate_errors(column_counts: np.ndarray, num_people: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """L1 errors of every candidate answer for a frame's ``(W, 7)`` per-column colour counts, and
    the candidates: ``(24,)`` errors and ``(24, 1)`` people for one person; for two, ``(552,)``
    errors of the ordered pairs (each at its best column split: left part against the first
    person's expected counts, right part against the second's) and ``(552, 2)`` pairs."""
    expected = expected_counts(size)
    count = len(IDENTITIES)
    if num_people == 1:
        return np.abs(column_counts.sum(0) - expected).sum(-1), np.arange(count)[:, None]
    if num_people != 2:
        raise ValueError(f"the tiny world has one or two people per video, not {num_people}")
    left = np.concatenate([np.zeros_like(column_counts[:1]), np.cumsum(column_counts, axis=0)])  # (W + 1, 7)
    right = left[-1] - left
    error_left = np.abs(left[:, None] - expected[None]).sum(-1)  # (W + 1, 24)
    error_right = np.abs(right[:, None] - expected[None]).sum(-1)
    total = (error_left[:, :, None] + error_right[:, None, :]).min(axis=0)  # (24 left, 24 right), best split
    first, second = np.nonzero(~np.eye(count, dtype=bool))
    return total[first, second], np.stack([first, second], axis=1)


def predict(column_counts: np.ndarray, num_people: int, size: int) -> tuple[int, ...]:
    """Indices into ``IDENTITIES`` of the people a frame shows, from its ``(W, 7)`` per-column
    colour counts. One person: the nearest (L1) expected counts over the whole frame. Two: the
    ordered pair and the column split between them for which left and right part are together
    nearest to the two people's expected counts (so who has which hair is part of the answer)."""
    errors, candidates = candidate_errors(column_counts, num_people, size)
    return tuple(int(person) for person in candidates[errors.argmin()])


def identity_score(frames: np.ndarray, people: list[Identity], temperature: float = 0.0) -> float:
    """Mean over frames of the fraction of ``people`` the classifier finds in the frame.

    ``temperature > 0`` gives the soft score: instead of the nearest candidate's hits, the hits
    expected under ``softmax(-error / (temperature * size**2 / 1024))`` over all candidates (the
    temperature is in pixels of a 32 x 32 frame). It tends to the hard score as the temperature
    goes to 0 and, unlike it, moves a little with every pixel: a denser reward for training.
    """
    size = frames.shape[-2]
    wanted = np.array([IDENTITIES.index(person) for person in people])
    counts = colour_counts(frames, per_column=True)  # (F, W, 7)
    scores = []
    for frame_counts in counts:
        errors, candidates = candidate_errors(frame_counts, len(people), size)
        hits = np.isin(candidates, wanted).sum(axis=1) / len(people)
        if temperature > 0:
            logits = -errors / (temperature * size ** 2 / 1024)
            weights = np.exp(logits - logits.max())
            scores.append(float((weights * hits).sum() / weights.sum()))
        else:
            scores.append(float(hits[errors.argmin()]))
    return float(np.mean(scores))


def extra_people(frames: np.ndarray, people: list[Identity]) -> float:
    """How many people more than ``people`` a ``(F, H, W, 3)`` uint8 video draws, judged by skin
    alone: the median over frames of (the frame's skin pixels - the referenced people's expected
    skin pixels) / one person's mean skin pixels. Near 0 for a video of just its people, near 1
    with one more (measured on drawn videos: docs/tiny_world.md, "Extra people"); the identity
    check is no count of people."""
    expected_skin = expected_counts(frames.shape[-2])[:, :_NUM_SKINS].sum(axis=1)  # (24,)
    skin = colour_counts(frames)[..., :_NUM_SKINS].sum(axis=-1)  # (F,)
    referenced = sum(expected_skin[IDENTITIES.index(person)] for person in people)
    return float(np.median((skin - referenced) / expected_skin.mean()))


def extra_people_batch(frames: torch.Tensor, people: list[list[Identity]]) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 frames -> ``(B,)`` :func:`extra_people`."""
    array = frames.cpu().numpy()
    return torch.tensor([extra_people(video, who) for video, who in zip(array, people)], dtype=torch.float32)


def score_batch(frames: torch.Tensor, people: list[list[Identity]], temperature: float = 0.0) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 frames -> ``(B,)`` identity scores (:func:`identity_score`)."""
    array = frames.cpu().numpy()
    return torch.tensor([identity_score(video, who, temperature) for video, who in zip(array, people)],
                        dtype=torch.float32)
