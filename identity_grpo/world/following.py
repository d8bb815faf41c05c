"""How well a world generator draws the referenced people, on many scenes rather than the 32 test rows.

The test rows are few: one run's identity check on them moves by about 0.04 between evaluations,
the size of the effects measured there (docs/tiny_world.md). This samples 96 one-person and 96
two-person random scenes (all 24 people; drawn from their own stream, so they are not the
training rows) with several noise seeds each, and reports the mean identity check of each kind and
the fraction of videos that draw an extra person (the identity check is no count of people).

Command line, for a generator and optionally a trained LoRA (a run's ``lora`` folder):

    python -m identity_grpo.world.following [--generator dataset/tiny_world/models/wan_vace]
        [--lora RUN/lora [--compare]] [--seeds 0 1] [--sde]

``--compare`` also scores the generator without the LoRA and prints both (what the quick start
prints after training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from identity_grpo.world.identity import extra_people, identity_score
from identity_grpo.world.render import IDENTITIES, sample_scene

SIZE, FRAMES = 32, 5
SCENE_SEED = 123
# A video "draws an extra person" when its skin exceeds its references' by more than half a person.
EXTRA_PERSON = 0.5


def held_out_scenes(count: int = 96, seed: int = SCENE_SEED) -> dict[str, list]:
    """``{"one": [...], "two": [...]}``: the first ``count`` one-person and two-person scenes of a
    random stream (400 draws)."""
    rng = np.random.default_rng(seed)
    drawn = [sample_scene(rng, IDENTITIES, FRAMES) for _ in range(400)]
    return {"one": [scene for scene in drawn if len(scene.people) == 1][:count],
            "two": [scene for scene in drawn if len(scene.people) == 2][:count]}


@torch.no_grad()
def video_scores(pipeline, scenes, seeds=(0, 1), shift: int = 0, **sampler) -> tuple[np.ndarray, np.ndarray]:
    """The identity check and :func:`extra_people` of ``pipeline``'s videos of ``scenes``, one per
    scene and noise seed. ``sampler`` goes to the pipeline (``sde_steps=[]``: the deterministic
    sampler; ``sde=...``: the training SDE). ``shift > 0`` scores identity against other people (a
    fixed shift through the 24, never the referenced one): chance level."""
    from identity_grpo.world.generated_pairs import sample_world_videos

    identity, extra = [], []
    for seed in seeds:
        videos = sample_world_videos(pipeline, scenes, seed, size=SIZE, num_frames=FRAMES, **sampler)
        for video, scene in zip(videos, scenes):
            identity.append(identity_score(video, [IDENTITIES[(IDENTITIES.index(person) + shift) % len(IDENTITIES)]
                                                   for person in scene.people]))
            extra.append(extra_people(video, list(scene.people)))
    return np.array(identity), np.array(extra)


def mean_identity(pipeline, scenes, seeds=(0, 1), shift: int = 0, **sampler) -> float:
    """Mean identity check of :func:`video_scores`."""
    return float(video_scores(pipeline, scenes, seeds, shift, **sampler)[0].mean())


def following(generator: str | Path, lora: str | Path | None = None, seeds=(0, 1), sde: bool = False) -> dict:
    """``{"one": ..., "two": ..., "extra_one": ..., "extra_two": ...}``: the mean identity check of
    ``generator`` (with ``lora``, a peft folder, applied) on :func:`held_out_scenes`, one video per
    scene and noise seed, sampled with the evaluation's deterministic sampler or (``sde``) the
    training SDE at noise level 0.7; and the fraction of those videos that draw more than half a
    person more than referenced (:func:`extra_people` > ``EXTRA_PERSON``)."""
    from identity_grpo.pipelines.vace import SDEConfig
    from identity_grpo.world.generated_pairs import load_world_pipeline

    pipeline = load_world_pipeline(generator)
    if lora:
        from peft import PeftModel

        pipeline.transformer = PeftModel.from_pretrained(pipeline.transformer, lora).eval()
    sampler = {"sde": SDEConfig(noise_level=0.7)} if sde else {"sde_steps": []}
    results = {}
    for kind, scenes in held_out_scenes().items():
        identity, extra = video_scores(pipeline, scenes, seeds, **sampler)
        results[kind] = round(float(identity.mean()), 4)
        results[f"extra_{kind}"] = round(float((extra > EXTRA_PERSON).mean()), 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="dataset/tiny_world/models/wan_vace")
    parser.add_argument("--lora", default=None, help="a peft LoRA folder (a training run's lora/) to apply")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sde", action="store_true", help="sample with the training SDE (noise level 0.7)")
    parser.add_argument("--compare", action="store_true",
                        help="with --lora: also score the generator without it and print before -> after")
    args = parser.parse_args()
    if not Path(args.generator, "model_index.json").is_file():
        parser.error(f"--generator {args.generator}: no model_index.json (a world generator folder, e.g. "
                     "dataset/tiny_world/models/wan_vace)")
    if args.lora and not Path(args.lora, "adapter_config.json").is_file():
        parser.error(f"--lora {args.lora}: no adapter_config.json (a training run's lora/ folder)")
    if args.compare and not args.lora:
        parser.error("--compare compares the generator without and with --lora; give --lora RUN/lora")
    results = following(args.generator, args.lora, args.seeds, args.sde)
    record = {"generator": args.generator, "lora": args.lora, "seeds": args.seeds,
              "sampler": "sde" if args.sde else "ode", **results}
    if args.compare:
        before = following(args.generator, None, args.seeds, args.sde)
        record["before"] = before
        counts = {kind: len(scenes) for kind, scenes in held_out_scenes().items()}
        for kind, label in (("one", "one-person"), ("two", "two-person")):
            print(f"identity check, {counts[kind]} held-out {label} scenes x {len(args.seeds)} seeds: "
                  f"{before[kind]:.3f} -> {results[kind]:.3f} ({results[kind] / before[kind] - 1:+.0%}); "
                  f"videos with an extra person {before['extra_' + kind]:.0%} -> {results['extra_' + kind]:.0%}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
