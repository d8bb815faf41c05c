"""Build the tiny world: its data set, a trained Wan VAE and VACE transformer and (unless
``--no-reward``) its identity reward model, written where the ``tiny_world`` preset finds them.

    python scripts/build_tiny_world.py                # dataset/tiny_world/ (the committed world)
    python scripts/build_tiny_world.py --quick OUT    # seconds-long smoke build (untrained, no reward model)

Deterministic on one machine (seeded; two builds give identical weights). Timings and numbers:
docs/tiny_world.md.
"""

import argparse
import logging
import time
from pathlib import Path

from identity_grpo.world.build import BuildSettings, WorldSize, build_generator, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="dataset/tiny_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few training steps only (for tests)")
    parser.add_argument("--no-reward", action="store_true", help="skip the identity reward model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = BuildSettings(seed=args.seed)
    if args.quick:
        settings = BuildSettings(seed=args.seed, vae_steps=2, vae_batch=4, num_scenes=16, transformer_steps=2,
                                 transformer_batch=4)
    out = Path(args.out)
    start = time.time()
    write_dataset(out, seed=args.seed)
    build_generator(settings, WorldSize()).save_pretrained(out / "models" / "wan_vace")
    if not (args.no_reward or args.quick):
        from identity_grpo.world.reward import build_world_reward_model

        build_world_reward_model(out / "models" / "identity_reward", seed=args.seed)
    logging.info("tiny world written to %s in %.0f s", out, time.time() - start)


if __name__ == "__main__":
    main()
