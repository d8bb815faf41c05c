"""Preference pairs of the tiny world, for training its identity reward model.

Every pair shows one scene twice against the references of its people, in the preference-CSV
format of :mod:`vace_reward.data` plus a ``kind`` column (which the reader ignores)::

    ref_paths,prompt,video_a,video_b,label,kind
    refs/pale_blond_long.png,a woman walks to the left by the sea,videos/train_0007_a.mp4,videos/train_0007_b.mp4,B,swap_hair

Drawn kinds (the preferred video always shows the references' people, undistorted):

============================  =================================================================
``swap_skin``                 one person replaced by the identity of the same hair style that
``swap_hair``                 differs in skin only / hair colour only / both
``swap_both``
``hue``                       one person's face box with its hue rotated by 90-270 degrees
``blur``                      one person's face box Gaussian-blurred (radius 1.5 px at 32 px)
``tie_same_people``           label ``tie``: both correct, other background and/or motion
``tie_both_swapped``          label ``tie``: both wrong, the same person replaced by two other
                              identities, each differing in skin and hair colour
============================  =================================================================

``generated_same`` and ``generated_swap`` pairs compare the generator's own samples instead
(:mod:`identity_grpo.world.generated_pairs`).

Swaps keep the hair style, so the prompt (which names gender, never colour) fits both videos:
only the references tell which is right. Which of A and B holds the preferred video is a coin
flip. Training and held-out pairs come from different scenes, and the people of
``HELD_OUT_IDENTITIES`` appear only in held-out pairs (every skin and hair colour still occurs
in training). Videos are written losslessly at the reward model's 10 fps, so a file decodes to
the frames the GRPO loop scores in memory. Everything is drawn from one seed.

Command line: ``python -m identity_grpo.world.preferences OUT_DIR`` writes ``train.csv``,
``eval.csv``, ``refs/`` and ``videos/`` there.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from identity_grpo.world.render import (
    FACE_WIDTH,
    IDENTITIES,
    IDENTITY_BY_NAME,
    Identity,
    Scene,
    render_reference,
    render_video,
    sample_scene,
)
from vace_reward.data import PAIR_COLUMNS, write_video

SWAP_KINDS = ("swap_skin", "swap_hair", "swap_both")
DISTORTION_KINDS = ("hue", "blur")
TIE_KINDS = ("tie_same_people", "tie_both_swapped")
# One pair of each drawn kind per cycle of seven scenes: 3/7 swaps, 2/7 distortions, 2/7 ties.
DRAWN_KINDS = SWAP_KINDS + DISTORTION_KINDS + TIE_KINDS
# Pairs of the generator's own samples (identity_grpo.world.generated_pairs).
GENERATED_KINDS = ("generated_same", "generated_swap")
KINDS = DRAWN_KINDS + GENERATED_KINDS
HELD_OUT_IDENTITIES = ("pale_black_long", "tan_blond_short", "dark_red_long", "tan_white_short")
# The reward model reads 10 fps for in-memory frames; files at the same rate get the same
# temporal positions.
VIDEO_FPS = 10.0
# vace_reward.data's columns; its reader ignores the extra one.
PAIR_CSV_COLUMNS = PAIR_COLUMNS + ("kind",)


class NoSwapCandidate(ValueError):
    """No identity among those given can replace the chosen person as the pair kind asks."""


@dataclass(frozen=True)
class WorldPair:
    """One comparison of the world, before it is written.

    Attributes:
        kind: one of :data:`KINDS`.
        references: the people the videos should show, left to right (the references' order).
        prompt: the generation prompt (both videos fit it).
        video_a, video_b: ``(F, H, W, 3)`` uint8.
        label: ``"A"``, ``"B"`` or ``"tie"``.
        shown_a, shown_b: the people each video actually draws (after a swap), left to right.
    """

    kind: str
    references: tuple[Identity, ...]
    prompt: str
    video_a: np.ndarray
    video_b: np.ndarray
    label: str
    shown_a: tuple[Identity, ...]
    shown_b: tuple[Identity, ...]


@dataclass(frozen=True)
class PreferenceSetPaths:
    """Where :func:`write_preference_set` put the data set."""

    root: Path
    train_csv: Path
    eval_csv: Path


# ---------------------------------------------------------------------- scene edits

def swap_candidates(person: Identity, kind: str, identities) -> list[Identity]:
    """Identities of ``person``'s hair style that differ from it in skin only (``swap_skin``),
    hair colour only (``swap_hair``) or both (``swap_both``), within ``identities``."""
    differs = {
        "swap_skin": lambda other: other.skin != person.skin and other.hair == person.hair,
        "swap_hair": lambda other: other.skin == person.skin and other.hair != person.hair,
        "swap_both": lambda other: other.skin != person.skin and other.hair != person.hair,
    }[kind]
    return [other for other in identities if other.style == person.style and differs(other)]


def with_person(scene: Scene, slot: int, identity: Identity) -> Scene:
    """``scene`` with the person at ``slot`` (left to right) replaced by ``identity``."""
    people = list(scene.people)
    people[slot] = identity
    return dataclasses.replace(scene, people=tuple(people))


def restaged(scene: Scene, rng: np.random.Generator, num_frames: int) -> Scene:
    """The same people (same order) in a new layout whose background or motion differs."""
    while True:
        other = sample_scene(rng, scene.people, num_frames, max_people=len(scene.people))
        if len(other.people) == len(scene.people) and (other.background, other.motion) != (scene.background, scene.motion):
            return dataclasses.replace(other, people=scene.people)


def face_box(scene: Scene, slot: int, frame_index: int, size: int, num_frames: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` around the head and hair of person ``slot`` in a frame
    (the extent :func:`identity_grpo.world.render._draw_person` draws, long hair included)."""
    width = FACE_WIDTH * size
    height = 1.2 * width
    cx = scene.centres(num_frames)[frame_index, slot] * size
    cy = scene.y * size
    box = (cx - 0.65 * width, cy - 0.72 * height, cx + 0.65 * width, cy + 0.8 * height)
    x0, y0, x1, y1 = (round(float(value)) for value in box)
    return max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)


def rotate_hue(pixels: np.ndarray, turns: float) -> np.ndarray:
    """``(..., 3)`` uint8 with every hue rotated by ``turns`` of the colour wheel (saturation and
    value kept, so grey hair is unchanged and skin turns an impossible colour)."""
    flat = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    rotated = []
    for red, green, blue in flat:
        hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
        rotated.append(colorsys.hsv_to_rgb((hue + turns) % 1.0, saturation, value))
    return np.clip(np.round(np.asarray(rotated) * 255.0), 0, 255).astype(np.uint8).reshape(pixels.shape)


def distort_face(video: np.ndarray, scene: Scene, slot: int, kind: str, turns: float = 0.5) -> np.ndarray:
    """A copy of ``video`` with person ``slot``'s face box hue-rotated by ``turns`` (``hue``) or
    blurred (``blur``) in every frame; the rest of the frame is untouched."""
    num_frames, size = video.shape[0], video.shape[1]
    distorted = video.copy()
    for frame_index in range(num_frames):
        x0, y0, x1, y1 = face_box(scene, slot, frame_index, size, num_frames)
        if kind == "hue":
            distorted[frame_index, y0:y1, x0:x1] = rotate_hue(video[frame_index, y0:y1, x0:x1], turns)
        elif kind == "blur":
            # Blur the whole frame, paste back the box: the box's border mixes with its real surroundings.
            blurred = np.asarray(Image.fromarray(video[frame_index]).filter(ImageFilter.GaussianBlur(1.5 * size / 32)))
            distorted[frame_index, y0:y1, x0:x1] = blurred[y0:y1, x0:x1]
        else:
            raise ValueError(f"unknown distortion {kind!r}; use one of {DISTORTION_KINDS}")
    return distorted


# ---------------------------------------------------------------------- pairs

def make_pair(kind: str, scene: Scene, rng: np.random.Generator, identities, size: int, num_frames: int) -> WorldPair:
    """A pair of ``kind`` built on ``scene`` (its people are the references); swap-ins are drawn
    from ``identities`` and never repeat a person already in the scene."""
    if kind not in DRAWN_KINDS:
        raise ValueError(f"unknown drawn pair kind {kind!r}; use one of {DRAWN_KINDS}")
    people = scene.people
    slot = int(rng.integers(len(people)))
    person = people[slot]

    def swap_in(swap_kind: str, count: int = 1) -> list[Identity]:
        candidates = [other for other in swap_candidates(person, swap_kind, identities) if other not in people]
        if len(candidates) < count:
            raise NoSwapCandidate(f"{kind}: {len(candidates)} {swap_kind} candidates for {person.name} among the given "
                             f"identities, need {count}; pass more identities")
        chosen = rng.choice(len(candidates), size=count, replace=False)
        return [candidates[index] for index in chosen]

    correct = render_video(scene, size, num_frames)
    if kind in SWAP_KINDS:
        wrong_scene = with_person(scene, slot, swap_in(kind)[0])
        preferred, rejected = (correct, people), (render_video(wrong_scene, size, num_frames), wrong_scene.people)
    elif kind in DISTORTION_KINDS:
        turns = float(rng.uniform(0.25, 0.75))
        preferred, rejected = (correct, people), (distort_face(correct, scene, slot, kind, turns), people)
    elif kind == "tie_same_people":
        other = restaged(scene, rng, num_frames)
        preferred, rejected = (correct, people), (render_video(other, size, num_frames), people)
    else:  # tie_both_swapped
        first, second = (with_person(scene, slot, identity) for identity in swap_in("swap_both", count=2))
        preferred = (render_video(first, size, num_frames), first.people)
        rejected = (render_video(second, size, num_frames), second.people)
    preferred_first = bool(rng.random() < 0.5)
    (video_a, shown_a), (video_b, shown_b) = (preferred, rejected) if preferred_first else (rejected, preferred)
    label = "tie" if kind in TIE_KINDS else ("A" if preferred_first else "B")
    return WorldPair(kind, people, scene.prompt, video_a, video_b, label, shown_a, shown_b)


def split_identities(held_out: tuple[str, ...] = HELD_OUT_IDENTITIES) -> tuple[list[Identity], list[Identity]]:
    """``(training identities, all identities)``: the held-out people appear only in held-out pairs."""
    unknown = [name for name in held_out if name not in IDENTITY_BY_NAME]
    if unknown:
        raise ValueError(f"held-out identities {unknown} are not world people (names like {IDENTITIES[0].name!r})")
    return [identity for identity in IDENTITIES if identity.name not in held_out], list(IDENTITIES)


def world_pairs(num_pairs: int, seed: int, identities, size: int = 32, num_frames: int = 5,
                kinds: tuple[str, ...] = DRAWN_KINDS) -> list[WorldPair]:
    """``num_pairs`` pairs cycling through ``kinds``, each on its own random scene over ``identities``
    (a scene whose chosen person has no swap-in of the kind left among ``identities`` is redrawn)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_pairs):
        for _attempt in range(100):
            scene = sample_scene(rng, identities, num_frames)
            try:
                pairs.append(make_pair(kinds[index % len(kinds)], scene, rng, identities, size, num_frames))
                break
            except NoSwapCandidate:
                continue
        else:
            raise ValueError(f"pair {index} ({kinds[index % len(kinds)]}): no scene over the given identities "
                             "admits this kind in 100 draws; pass more identities")
    return pairs


def write_pairs(root: Path, name: str, pairs: list[WorldPair]) -> Path:
    """Write the videos of ``pairs`` to ``root/videos/``, their references to ``root/refs/`` and
    the CSV ``root/<name>.csv`` (paths relative to ``root``); return the CSV path."""
    (root / "refs").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, pair in enumerate(pairs):
        references = []
        for person in pair.references:
            reference = root / "refs" / f"{person.name}.png"
            if not reference.is_file():
                render_reference(person).save(reference)
            references.append(reference.relative_to(root).as_posix())
        videos = []
        for side, video in (("a", pair.video_a), ("b", pair.video_b)):
            path = root / "videos" / f"{name}_{index:04d}_{side}.mp4"
            write_video(path, video, fps=VIDEO_FPS, lossless=True)
            videos.append(path.relative_to(root).as_posix())
        rows.append([";".join(references), pair.prompt, *videos, pair.label, pair.kind])
    path = root / f"{name}.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIR_CSV_COLUMNS)
        writer.writerows(rows)
    return path


def read_kinds(path: str | Path) -> list[str]:
    """The ``kind`` of every row of a world preference CSV, in row order."""
    from identity_grpo.data import read_csv_rows
    from vace_reward.data import PreferenceDataError

    kinds = []
    for line, row in read_csv_rows(Path(path), ("kind",), error=PreferenceDataError):
        if row["kind"] not in KINDS:
            raise PreferenceDataError(f"{path}, row {line}, field 'kind': {row['kind']!r}; use one of {KINDS}")
        kinds.append(row["kind"])
    return kinds


def write_preference_set(out_dir: str | Path, num_train: int = 448, num_eval: int = 210, seed: int = 0,
                         size: int = 32, num_frames: int = 5) -> PreferenceSetPaths:
    """Write the world's training and held-out preference CSVs (and their media) to ``out_dir``.

    Training scenes use the training identities only; held-out scenes (their own random stream)
    use all 24 people. Deterministic in ``seed``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    train_identities, all_identities = split_identities()
    train = world_pairs(num_train, seed * 2, train_identities, size, num_frames)
    held_out = world_pairs(num_eval, seed * 2 + 1, all_identities, size, num_frames)
    return PreferenceSetPaths(root, write_pairs(root, "train", train), write_pairs(root, "eval", held_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write train.csv, eval.csv, refs/ and videos/ to")
    parser.add_argument("--num-train", type=int, default=448)
    parser.add_argument("--num-eval", type=int, default=210)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_preference_set(args.out_dir, args.num_train, args.num_eval, args.seed)
    print(paths.train_csv)
    print(paths.eval_csv)


if __name__ == "__main__":
    main()
