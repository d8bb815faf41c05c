"""Build the tiny world: its data set, a trained Wan VAE and VACE transformer and (unless
``--no-reward``) its identity reward models, written where the ``tiny_world`` preset finds them.

    python scripts/build_tiny_world.py                # dataset/tiny_world/ (the committed world)
    python scripts/build_tiny_world.py --quick OUT    # seconds-long smoke build (untrained, no reward model)

The reward models (an ensemble of three, seeds 0-2: ``models/identity_reward``,
``identity_reward_seed1``, ``identity_reward_seed2``) learn from drawn preference pairs only, so
they train one after another in a second process next to the generator (VAE, then
transformer): about 26 minutes on 2 cores instead of 46 on one.
Every model trains on one thread, as the committed ones did: another thread count rounds
differently and gives other weights in the last bits. Deterministic on one machine (seeded; two
builds give identical weights). Timings and numbers: docs/tiny_world.md.
"""

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from identity_grpo.world.build import BuildSettings, WorldSize, build_generator, write_dataset
from identity_grpo.world.reward import REWARD_ENSEMBLE_SEEDS, reward_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="dataset/tiny_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few training steps only (for tests)")
    parser.add_argument("--no-reward", action="store_true", help="skip the identity reward model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    settings = BuildSettings(seed=args.seed)
    if args.quick:
        settings = BuildSettings(seed=args.seed, vae_steps=2, vae_batch=4, num_scenes=16, transformer_steps=2,
                                 transformer_batch=4)
    out = Path(args.out)
    start = time.time()
    write_dataset(out, seed=args.seed)
    reward = None
    if not (args.no_reward or args.quick):
        commands = [shlex.join([sys.executable, "-m", "identity_grpo.world.reward",
                                str(out / "models" / reward_model_folder(seed)), "--seed", str(args.seed + seed)])
                    for seed in REWARD_ENSEMBLE_SEEDS]
        reward = subprocess.Popen(" && ".join(commands), shell=True, start_new_session=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        build_generator(settings, WorldSize()).save_pretrained(out / "models" / "wan_vace")
    except BaseException:
        if reward is not None:
            os.killpg(reward.pid, signal.SIGTERM)
        raise
    if reward is not None and reward.wait() != 0:
        sys.exit(f"a reward model build failed (exit {reward.returncode}); the generator is written; rerun the "
                 f"missing ones alone: python -m identity_grpo.world.reward {out / 'models'}/<folder> --seed <seed>")
    logging.info("tiny world written to %s in %.0f s", out, time.time() - start)


if __name__ == "__main__":
    main()
