"""Preference pairs between the world generator's own samples, labelled by the world's identity check.

The drawn pairs of :mod:`identity_grpo.world.preferences` show the reward model clean drawings;
GRPO then asks it to score the generator's samples, which look different (soft edges, half-right
hair), and a model trained on drawings alone was exploited there (docs/tiny_world.md). The paper's
reward model learned from people comparing *generated* videos; here the generator's samples are
compared by the world's soft identity check (:func:`identity_grpo.world.identity.identity_score`),
the world's stand-in for those annotators.

Per scene, ``samples_per_scene + 1`` samples of the training SDE (the rollouts' sampler and noise
level):

- ``samples_per_scene`` (default 2) from the scene's references: a ``generated_same`` pair for
  every two of them (which of two tries is closer; what a GRPO group compares), so K samples give
  K (K - 1) / 2 pairs;
- one from references with one person replaced by another identity of the same hair style (so
  the prompt still fits), scored against the TRUE references: a ``generated_swap`` pair against
  the first sample.

A pair whose two scores differ by less than ``margin`` is dropped (the check cannot tell them
apart); otherwise the higher-scoring video is preferred. Scenes hold one person in even batches
and two in odd ones (one reference count per sampler call).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import torch

from identity_grpo.pipelines.base import SDEConfig
from identity_grpo.rewards.world import SOFT_TEMPERATURE
from identity_grpo.world.identity import identity_score
from identity_grpo.world.preferences import WorldPair, with_person
from identity_grpo.world.render import IDENTITIES, Identity, Scene, render_reference, sample_scene

logger = logging.getLogger(__name__)

# The training rollouts' sampler (the tiny_world preset): 8 steps, guidance 1, SDE noise level 0.7.
NUM_STEPS = 8
NOISE_LEVEL = 0.7


def load_world_pipeline(model_dir: str | Path):
    """The rollout pipeline of a world generator folder (float32, CPU): VACE for a
    ``WanVACEPipeline`` folder (``models/wan_vace``), Phantom for a ``WanPipeline`` one
    (``models/wan_phantom``)."""
    from diffusers import DiffusionPipeline

    from identity_grpo.pipelines.phantom import PhantomRolloutPipeline
    from identity_grpo.pipelines.vace import VaceRolloutPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return PhantomRolloutPipeline(pipe) if type(pipe).__name__ == "WanPipeline" else VaceRolloutPipeline(pipe)


def sample_world_videos(pipeline, scenes: list[Scene], noise_seed: int, *, size: int = 32, num_frames: int = 5,
                        **sampler) -> np.ndarray:
    """``(N, F, H, W, 3)`` uint8 videos of ``scenes`` from a world pipeline, each from its people's
    portraits, at the world's sampling settings (8 steps, no guidance). ``sampler`` goes to the
    pipeline: ``sde=SDEConfig(...)`` for the training SDE, ``sde_steps=[]`` for the deterministic
    sampler."""
    references = {person.name: render_reference(person) for scene in scenes for person in scene.people}
    _, videos = pipeline([scene.prompt for scene in scenes],
                         [[references[person.name] for person in scene.people] for scene in scenes],
                         height=size, width=size, num_frames=num_frames, num_inference_steps=NUM_STEPS,
                         guidance_scale=1.0, max_sequence_length=16,
                         generator=torch.Generator().manual_seed(noise_seed), **sampler)
    return videos.numpy()


def _scenes(rng: np.random.Generator, identities, count: int, num_people: int, num_frames: int) -> list[Scene]:
    scenes = []
    while len(scenes) < count:
        scene = sample_scene(rng, identities, num_frames)
        if len(scene.people) == num_people:
            scenes.append(scene)
    return scenes


def _swapped(scene: Scene, rng: np.random.Generator, identities) -> Scene:
    """``scene`` with one person replaced by another identity of the same hair style."""
    slot = int(rng.integers(len(scene.people)))
    candidates = [other for other in identities if other.style == scene.people[slot].style and other not in scene.people]
    return with_person(scene, slot, candidates[int(rng.integers(len(candidates)))])


def generated_pairs(pipeline, num_scenes: int, seed: int, identities=IDENTITIES, *, margin: float = 0.05,
                    batch_size: int = 32, size: int = 32, num_frames: int = 5,
                    samples_per_scene: int = 2) -> list[WorldPair]:
    """``WorldPair``s from ``num_scenes`` scenes over ``identities`` (see the module docstring);
    deterministic in ``seed``. Returns the pairs in scene order."""
    if samples_per_scene < 2:
        raise ValueError(f"samples_per_scene must be at least 2 (a pair), got {samples_per_scene}")
    rng = np.random.default_rng(seed)

    def sample(scenes: list[Scene], noise_seed: int) -> np.ndarray:
        return sample_world_videos(pipeline, scenes, noise_seed, size=size, num_frames=num_frames,
                                   sde=SDEConfig(noise_level=NOISE_LEVEL))

    pairs = []
    for batch_index, start in enumerate(range(0, num_scenes, batch_size)):
        scenes = _scenes(rng, identities, min(batch_size, num_scenes - start), 1 + batch_index % 2, num_frames)
        swapped = [_swapped(scene, rng, identities) for scene in scenes]
        noise_seed = seed * 1000 + start
        tries = [sample(scenes, noise_seed + k) for k in range(samples_per_scene)]
        other = sample(swapped, noise_seed + samples_per_scene)
        for index, (scene, wrong) in enumerate(zip(scenes, swapped)):
            people: list[Identity] = list(scene.people)
            mine = [(videos[index], identity_score(videos[index], people, SOFT_TEMPERATURE), scene.people)
                    for videos in tries]
            swap = (other[index], identity_score(other[index], people, SOFT_TEMPERATURE), wrong.people)
            comparisons = [("generated_same", *two) for two in itertools.combinations(mine, 2)]
            for kind, this, rival in comparisons + [("generated_swap", mine[0], swap)]:
                if abs(this[1] - rival[1]) < margin:
                    continue
                # shown_a / shown_b: the references each video was generated from.
                (video_a, score_a, shown_a), (video_b, score_b, shown_b) = (this, rival) if rng.random() < 0.5 \
                    else (rival, this)
                pairs.append(WorldPair(kind, scene.people, scene.prompt, video_a, video_b,
                                       "A" if score_a > score_b else "B", shown_a, shown_b))
        logger.info("generated pairs: %d scenes, %d pairs", start + len(scenes), len(pairs))
    return pairs
