"""FaceSim and the copy-paste score with real weights on real photographs, offline.

Weights: dlib's HOG detector, 5-point shape predictor and ResNet embedder (``dlib-bin`` +
``face_recognition_models``, the ``faces`` extra). Photos that ship in installed packages (nothing
is copied into this repository): insightface's sample group photo ``t1.jpg`` (six people) and
portrait ``Tom_Hanks_54745.png`` (insightface wheel, MIT), scikit-image's ``astronaut`` (Eileen
Collins, NASA, public domain) and ``chelsea`` (a cat: no human face). ``bash scripts/tests.sh``
installs them all (``scripts/install.sh dev``).
"""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from identity_grpo.rewards import RewardInputs, build_reward_fn
from identity_grpo.rewards.copy_paste import copy_paste_columns, copy_paste_scorer
from identity_grpo.rewards.facesim import FaceSimScorer, facesim_columns

EXTRA_MISSING = next((name for name in ("dlib", "face_recognition_models", "cv2", "skimage", "insightface")
                      if importlib.util.find_spec(name) is None), None)
pytestmark = pytest.mark.skipif(
    EXTRA_MISSING is not None,
    reason=f"{EXTRA_MISSING} is not installed: these tests need the 'faces' extra and the sample photos of "
           "scikit-image and insightface (bash scripts/install.sh dev, as the README's test command does)",
)

# dlib's same-person rule ||a - b|| < 0.6 as a cosine for descriptors of norm about 1.45 (faces_dlib docstring).
DLIB_SAME_PERSON_COSINE = 0.914


@pytest.fixture(scope="module")
def scorer():
    return FaceSimScorer.from_config(SimpleNamespace(facesim={"backend": "dlib"}))


@pytest.fixture(scope="module")
def photos():
    import importlib.resources

    from skimage import data

    images = importlib.resources.files("insightface") / "data" / "images"
    return {
        "group": np.asarray(Image.open(images / "t1.jpg").convert("RGB")),
        "hanks": np.asarray(Image.open(images / "Tom_Hanks_54745.png").convert("RGB")),
        "astronaut": data.astronaut(),
        "cat": data.chelsea(),
    }


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def _portrait(image: np.ndarray, box, margin: float = 0.6) -> np.ndarray:
    """The face in ``box`` with ``margin`` of its size around it: a reference photo of one person."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return image[max(0, int(y0 - margin * h)):int(y1 + margin * h), max(0, int(x0 - margin * w)):int(x1 + margin * w)]


def _paste(background: np.ndarray, photo: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    frame = background.copy()
    frame[top:top + size, left:left + size] = _resize(photo, size, size)
    return frame


def test_same_person_scores_higher_than_everyone_else(scorer, photos):
    # Largest face first: HOG (upsampled once) also fires on a patch of the astronaut's suit.
    astronaut = scorer.faces(photos["astronaut"])[:1]
    mirrored = scorer.faces(np.ascontiguousarray(photos["astronaut"][:, ::-1]))[:1]
    others = torch.cat([scorer.faces(photos["group"]), scorer.faces(photos["hanks"])])
    assert astronaut.shape == mirrored.shape == (1, 128) and others.shape == (7, 128)
    same = float(_cosine(astronaut, mirrored))
    different = _cosine(astronaut, others)[0]
    # Measured: same 0.992; the six people of the group photo and Tom Hanks 0.82-0.89.
    assert same > DLIB_SAME_PERSON_COSINE > float(different.max())
    # dlib's own Euclidean rule agrees.
    assert float((astronaut - mirrored).norm()) < 0.6 < float((astronaut - others).norm(dim=1).min())


def test_group_photo_matches_every_reference_to_its_own_face(scorer, photos):
    group = photos["group"]
    people = scorer.detector.detect(group)
    assert len(people) == 6
    # References: each person's portrait cut from the full-size photo and mirrored; the video frame:
    # the whole photo at half size. Different pixels, pose mirrored, same six people.
    references = [Image.fromarray(_portrait(group, face.box)).transpose(Image.FLIP_LEFT_RIGHT) for face in people]
    frame = _resize(group, 640, 443)
    scores = scorer.score(torch.from_numpy(frame[None, None].copy()), [references])
    assert scores.skipped_frames.tolist() == [0]
    assert bool((scores.per_subject[0] > DLIB_SAME_PERSON_COSINE).all()), scores.per_subject

    # Which face each reference matched: its own (the frame face nearest its box centre, at half size).
    frame_faces = scorer.detector.detect(frame)
    assert len(frame_faces) == 6
    reference_embeddings = torch.cat(scorer.reference_embeddings([references])[0])
    similarity = _cosine(reference_embeddings, scorer.embedder.embed(frame, frame_faces))
    centres = np.array([[(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2] for f in frame_faces])
    for k, person in enumerate(people):
        own = np.linalg.norm(centres - np.array([person.box[0] + person.box[2], person.box[1] + person.box[3]]) / 4,
                             axis=1).argmin()
        assert int(similarity[k].argmax()) == own
        others = torch.cat([similarity[k, :own], similarity[k, own + 1:]])
        assert float(similarity[k, own]) > float(others.max())
        assert float(similarity[k, own]) == pytest.approx(float(scores.per_subject[0, k]), abs=1e-6)


def test_frame_without_a_face_is_skipped_and_the_worst_subject_is_the_minimum(scorer, photos):
    astronaut, hanks = photos["astronaut"], photos["hanks"]
    frames = np.stack([
        _resize(astronaut, 320, 320),
        _resize(photos["cat"], 320, 320),  # a cat: no human face
        _resize(np.ascontiguousarray(astronaut[:, ::-1]), 320, 320),
    ])
    references = [Image.fromarray(astronaut), Image.fromarray(hanks)]
    scores = scorer.score(torch.from_numpy(frames[None].copy()), [references])
    assert scores.skipped_frames.tolist() == [1] and scores.num_frames.tolist() == [3]

    # By hand: each reference (its largest face) against its best face in frames 0 and 2, clipped
    # at 0, averaged over those 2 frames.
    reference = torch.cat([scorer.faces(astronaut)[:1], scorer.faces(hanks)[:1]])
    best = [_cosine(reference, scorer.faces(frames[f])).amax(dim=1) for f in (0, 2)]
    expected = torch.stack(best, dim=1).clamp_min(0).mean(dim=1)
    assert scores.per_subject[0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert float(scores.per_subject[0, 0]) > DLIB_SAME_PERSON_COSINE > float(scores.per_subject[0, 1])
    assert float(scores.min[0]) == float(scores.per_subject[0].min()) == float(scores.per_subject[0, 1])
    assert float(scores.mean[0]) == pytest.approx(float(expected.mean()), abs=1e-6)
    assert facesim_columns(scores, scorer.metric_name)[0]["FaceSim-dlib/skipped_frames"] == 1


def test_copy_paste_separates_a_pasted_face_from_the_same_person(scorer, photos):
    astronaut = photos["astronaut"]
    background = _resize(photos["cat"], 480, 320)
    pasted = np.stack([_paste(background, astronaut, 256, 40, 200), _paste(background, astronaut, 200, 100, 20)])
    rotated = np.asarray(Image.fromarray(astronaut).rotate(12, resample=Image.BILINEAR))
    same_person = np.stack([_paste(background, np.ascontiguousarray(astronaut[:, ::-1]), 256, 40, 200),
                            _paste(background, rotated[:, ::-1], 256, 40, 100)])
    group = _resize(photos["group"], 480, 320)
    videos = torch.from_numpy(np.stack([pasted, same_person, np.stack([group, group])]))
    references = [[Image.fromarray(astronaut)]] * 3

    identity = scorer.score(videos, references)
    copies = copy_paste_scorer(scorer).score(videos, references)
    # Identity cannot tell a paste from the same person in another pose; the copy-paste score can.
    # Measured: identity 0.981 (pasted), 0.980 (mirrored), 0.895 (others); copy-paste 0.991 (pasted,
    # resized and moved), 0.294 (mirrored, one frame also rotated), 0.295 (other people, best of six).
    assert float(identity.mean[0]) > DLIB_SAME_PERSON_COSINE and float(identity.mean[1]) > DLIB_SAME_PERSON_COSINE
    assert float(copies.mean[0]) > 0.95
    assert float(copies.mean[1]) < 0.5
    assert float(copies.mean[2]) < 0.5
    assert copy_paste_columns(copies)[0]["CopyPaste/max"] == pytest.approx(float(copies.mean[0]))


def test_the_reward_registry_runs_dlib_facesim_copy_paste_and_motion(photos):
    config = SimpleNamespace(reward_fn={"facesim": 1.0, "copy_paste": 0.0, "motion": 0.0},
                             facesim={"backend": "dlib", "num_frames": 2})
    reward_fn = build_reward_fn(config, torch.device("cpu"))
    astronaut, hanks = photos["astronaut"], photos["hanks"]
    background = _resize(photos["cat"], 480, 320)
    # Video 0: the astronaut pasted, sliding right; video 1: Tom Hanks pasted, mirrored.
    video_0 = np.stack([_paste(background, astronaut, 256, 40, 100 + 4 * t) for t in range(3)])
    video_1 = np.stack([_paste(background, np.ascontiguousarray(hanks[:, ::-1]), 224, 60, 120) for _ in range(3)])
    inputs = RewardInputs(torch.from_numpy(np.stack([video_0, video_1])),
                          [[Image.fromarray(astronaut)], [Image.fromarray(hanks)]], ["astronaut", "hanks"])
    scores, seconds = reward_fn(inputs)
    assert set(seconds) == {"facesim", "copy_paste", "motion"}
    assert {"facesim", "facesim/min", "facesim/skipped_frames", "copy_paste", "copy_paste/max", "motion",
            "total"} <= set(scores)
    assert bool((scores["facesim"] > DLIB_SAME_PERSON_COSINE).all())
    assert scores["total"].tolist() == pytest.approx(scores["facesim"].tolist())  # weights 0 for the diagnostics
    assert float(scores["copy_paste"][0]) > 0.95 > 0.5 > float(scores["copy_paste"][1])
    # Motion (OpenS2V's signed mean flow, |mean(dx, dy)|): in video 0 the 256x256 paste, 0.427 of the
    # 480x320 frame, moves 4 px right a frame: 0.427 * (4 + 0) / 2 = 0.853 (measured 0.849).
    # Video 1 is still: 0 up to Farneback's rounding (measured 2e-5).
    assert float(scores["motion"][0]) == pytest.approx(256 * 256 / (480 * 320) * 4 / 2, rel=0.05)
    assert float(scores["motion"][1]) == pytest.approx(0.0, abs=1e-3)
