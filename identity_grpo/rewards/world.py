"""``world_identity``: the tiny world's identity check (:mod:`identity_grpo.world.identity`) as a
reward, to log beside the learned identity reward on the tiny-world presets;
``world_identity_soft``, its soft form (a denser training signal, see ``identity_score``); and
``world_extra_people``, how many people more than referenced a video draws (logged, not trained).

Its references must be tiny-world portraits; each is recognised by comparing it with the
world's own drawings of its 24 people (nearest in pixels), so it needs no file names.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from identity_grpo.rewards import RewardInputs, register


@lru_cache(maxsize=1)
def _portraits() -> np.ndarray:
    from identity_grpo.world.render import IDENTITIES, render_reference

    return np.stack([np.asarray(render_reference(identity), dtype=np.float32) for identity in IDENTITIES])


def recognise_reference(image) -> int:
    """Index into ``IDENTITIES`` of the world portrait nearest to ``image``; raises if none is
    close (the image is not a tiny-world reference)."""
    portraits = _portraits()
    pixels = np.asarray(image.convert("RGB").resize(portraits.shape[1:3][::-1]), dtype=np.float32)
    distances = np.abs(portraits - pixels).mean(axis=(1, 2, 3))
    best = int(distances.argmin())
    if distances[best] > 8.0:
        raise ValueError("the world rewards (world_identity, world_identity_soft, world_extra_people) need "
                         "tiny-world reference portraits (dataset/tiny_world); "
                         f"a reference differs from every world portrait by >= {distances[best]:.1f} grey levels")
    return best


@register("world_identity")
def world_identity(config, device):
    """Factory; the fn returns ``world_identity`` ``(B,)`` in [0, 1]: the fraction of each video's
    references its frames show (mean over frames); 1/24 is chance for one reference."""
    from identity_grpo.world.identity import score_batch

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        return {"world_identity": score_batch(inputs.frames, _people(inputs))}

    return fn


# Temperature of the soft score, in pixels of a 32 x 32 frame: drawn videos still score 0.97-0.98
# (1.0 hard), while a generated face that is nearly right earns part of the credit.
SOFT_TEMPERATURE = 10.0


@register("world_identity_soft")
def world_identity_soft(config, device):
    """Factory; the fn returns ``world_identity_soft`` ``(B,)`` in [0, 1]: ``world_identity``'s
    expected hits under a softmax over every candidate answer (temperature ``SOFT_TEMPERATURE``)."""
    from identity_grpo.world.identity import score_batch

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        return {"world_identity_soft": score_batch(inputs.frames, _people(inputs), SOFT_TEMPERATURE)}

    return fn


@register("world_extra_people")
def world_extra_people(config, device):
    """Factory; the fn returns ``world_extra_people`` ``(B,)``: how many people more than its
    references each video draws, judged by skin pixels (``extra_people``; about 0 for a video of
    just its people, 1 with one more). Logged by the tiny-world presets at weight 0: the reward
    models do not penalise an extra person, and the identity check is no count (docs/tiny_world.md)."""
    from identity_grpo.world.identity import extra_people_batch

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        return {"world_extra_people": extra_people_batch(inputs.frames, _people(inputs))}

    return fn


def _people(inputs: RewardInputs) -> list:
    from identity_grpo.world.render import IDENTITIES

    return [[IDENTITIES[recognise_reference(image)] for image in refs] for refs in inputs.reference_images]
