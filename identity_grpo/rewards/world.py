"""``world_identity``: the tiny world's identity check (:mod:`identity_grpo.world.identity`) as a
reward, to log beside the learned identity reward on the tiny-world presets.

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
        raise ValueError("reward 'world_identity' needs tiny-world reference portraits (dataset/tiny_world); "
                         f"a reference differs from every world portrait by >= {distances[best]:.1f} grey levels")
    return best


@register("world_identity")
def world_identity(config, device):
    """Factory; the fn returns ``world_identity`` ``(B,)`` in [0, 1]: the fraction of each video's
    references its frames show (mean over frames); 1/24 is chance for one reference."""
    from identity_grpo.world.identity import score_batch
    from identity_grpo.world.render import IDENTITIES

    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        people = [[IDENTITIES[recognise_reference(image)] for image in refs] for refs in inputs.reference_images]
        return {"world_identity": score_batch(inputs.frames, people)}

    return fn
