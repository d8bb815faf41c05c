"""Build the tiny world: its data set, a trained Wan VAE and VACE transformer, a Phantom
transformer on the same VAE and text encoder, and (unless ``--no-reward``) its identity reward
models, written where the ``tiny_world`` and ``tiny_world_phantom`` presets find them.

    python scripts/build_tiny_world.py                # dataset/tiny_world/ (the committed world)
    python scripts/build_tiny_world.py --quick OUT    # seconds-long smoke build (untrained, no reward model)
    python scripts/build_tiny_world.py --only-phantom # the Phantom generator alone, on the existing world's
                                                      # VAE and text encoder (the same weights a full build gives)

The reward models (an ensemble of four, seeds 0-3: ``models/identity_reward_seed0`` ...
``identity_reward_seed3``) learn from drawn preference pairs and from pairs of the VACE
generator's own samples, so they train once it is written, side by side in four more processes
next to the Phantom transformer: about 75 minutes on 2 cores in all.
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

from identity_grpo.world.build import BuildSettings, WorldSize, build_generator, build_phantom_generator, write_dataset
from identity_grpo.world.reward import REWARD_ENSEMBLE_SEEDS, reward_model_folder


def reward_command(out: Path, seed: int, build_seed: int) -> list[str]:
    """The command line that trains the world's reward model of ``seed`` (its folder under
    ``out/models``; seeded ``build_seed + seed``) on drawn pairs and on pairs of ``out``'s VACE
    generator's own samples."""
    return [sys.executable, "-m", "identity_grpo.world.reward", str(out / "models" / reward_model_folder(seed)),
            "--seed", str(build_seed + seed), "--generator", str(out / "models" / "wan_vace")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="dataset/tiny_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few training steps only (for tests)")
    parser.add_argument("--no-reward", action="store_true", help="skip the identity reward model")
    parser.add_argument("--only-phantom", action="store_true",
                        help="train only the Phantom generator, on OUT's existing models/wan_vace (its VAE, text "
                             "encoder and scheduler)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    settings = BuildSettings(seed=args.seed)
    if args.quick:
        settings = BuildSettings(seed=args.seed, vae_steps=2, vae_batch=4, num_scenes=16, transformer_steps=2,
                                 transformer_batch=4)
    out = Path(args.out)
    start = time.time()
    if args.only_phantom:
        from diffusers import WanVACEPipeline

        base = out / "models" / "wan_vace"
        if not (base / "model_index.json").is_file():
            sys.exit(f"--only-phantom trains on an existing world's VACE generator, and {base} holds none; build "
                     "the whole world first (python scripts/build_tiny_world.py)")
        build_phantom_generator(settings, WorldSize(), WanVACEPipeline.from_pretrained(base)).save_pretrained(
            out / "models" / "wan_phantom")
        logging.info("Phantom generator written to %s in %.0f s", out / "models" / "wan_phantom", time.time() - start)
        return
    write_dataset(out, seed=args.seed)
    commands = [] if args.no_reward or args.quick else [reward_command(out, seed, args.seed)
                                                         for seed in REWARD_ENSEMBLE_SEEDS]
    rewards = []
    try:
        vace = build_generator(settings, WorldSize())
        vace.save_pretrained(out / "models" / "wan_vace")
        # The reward models learn from the VACE generator's own samples too, so they start once it
        # is written, side by side (one thread each) and next to the Phantom training.
        rewards = [subprocess.Popen(command, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                   for command in commands]
        build_phantom_generator(settings, WorldSize(), vace).save_pretrained(out / "models" / "wan_phantom")
        failed = [command for command, process in zip(commands, rewards) if process.wait() != 0]
    except BaseException:
        for process in rewards:
            os.killpg(process.pid, signal.SIGTERM)
        raise
    if failed:
        sys.exit("a reward model build failed; the generators are written; rerun it alone: "
                 + "; ".join(shlex.join(command) for command in failed))
    logging.info("tiny world written to %s in %.0f s", out, time.time() - start)


if __name__ == "__main__":
    main()
