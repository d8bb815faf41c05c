"""GRPO (upstream settings), GRPO window, GRPO fast, DiffusionNFT and EvoID side by side on the
tiny world (docs/tiny_world.md): the evaluation reward against transformer forward-equivalents
(batch elements of forward calls, a backward pass counting 2; analytic, the formulas ``nfe.py``
checks by hook counts) and against wall time, the same seeds, rows and reward for every variant.

Each variant is a real run of ``train_wan2_1_vace.py`` (tiny_world / tiny_world_nft /
tiny_world_evoid presets) with evaluation every ``--eval-every`` epochs; the curves are read from
its tensorboard events. Prints a table (final reward, forward-equivalents and seconds to reach
GRPO's final reward) and writes ``algorithms.png`` (reward vs forward-equivalents) next to ``--out``.

    python benchmarks/algorithms.py [--epochs 30] [--seeds 0 1] [--reward world_identity_soft] [--variants NAME ...]
                                    [--out benchmarks/results]
    # --full: seeds 0 1 2

The world's models were trained for real but are tiny, and its rewards are its identity check or
pixel statistics: this compares the algorithms' mechanics and costs, not what they do to a real
Wan model with the identity reward model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import common
import nfe

# Every variant samples 32 videos an epoch (the tiny_world preset's own is 64 since the identity
# runs were measured on many scenes; the comparisons in docs/tiny_world.md are at 32).
SAME_BATCH = ["--config.sample.train_batch_size=32"]
VARIANTS = {
    # name: (preset, overrides)
    "GRPO (upstream settings)": ("tiny_world", SAME_BATCH),
    "GRPO window 2": ("tiny_world", [*SAME_BATCH, "--config.sample.sde_window_size=2"]),
    "GRPO fast (window 2)": ("tiny_world", [*SAME_BATCH, "--config.sample.sde_window_size=2",
                                            "--config.sample.fast_branch=True", "--config.sample.same_latent=True"]),
    "DiffusionNFT": ("tiny_world_nft", []),
    "EvoID": ("tiny_world_evoid", []),
}


def run(name: str, preset: str, overrides: list[str], seed: int, args, logdir: Path) -> tuple[list, float]:
    """Run one variant; returns its eval curve [(epoch, reward)] and its wall time in seconds."""
    command = [sys.executable, str(common.REPO / "train_wan2_1_vace.py"), "--config",
               f"{common.REPO / 'config' / 'dgx.py'}:{preset}", f"--config.logdir={logdir}",
               f"--config.seed={seed}", f"--config.num_epochs={args.epochs}", f"--config.eval_freq={args.eval_every}",
               "--config.tracker=tensorboard", "--config.run_name=run", "--config.log_videos_freq=0",
               "--config.sample.eval_sde=False", f"--config.reward_fn={{{args.reward!r}: 1.0}}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return eval_curve(logdir, args.reward), seconds


def eval_curve(logdir: Path, reward: str) -> list[tuple[int, float]]:
    """``[(optimizer step, eval/<reward>)]`` from the run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(logdir.rglob("events.out.tfevents.*"))
    points = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        if f"eval/{reward}" in accumulator.Tags().get("scalars", []):
            points.update({e.step: e.value for e in accumulator.Scalars(f"eval/{reward}")})
    if not points:
        raise RuntimeError(f"no eval/{reward} in the tensorboard events under {logdir}")
    return sorted(points.items())


def per_epoch_cost(preset: str, overrides: list[str]) -> int:
    """Forward-equivalents of one epoch of the variant (one rank)."""
    config = common.preset(preset)
    for override in overrides:
        field, value = override.removeprefix("--config.").split("=")
        section, name = field.split(".")
        config[section][name] = type(config[section][name])(value == "True" if value in ("True", "False") else value)
    return nfe.analytic(config, "ours")["forward_equivalents"]


def print_seed_means(results: dict, variants: dict, seeds: list[int]) -> None:
    """Each variant's curve averaged over the seeds (its evaluations fall at the same epochs for
    every seed), and the forward-equivalents its mean curve needs to reach GRPO's mean final
    reward: one seed's GRPO can fail to learn (then its "final" is no target)."""
    curves = {name: [sum(results[(name, seed)][0][i][1] for seed in seeds) / len(seeds)
                     for i in range(len(results[(name, seeds[0])][0]))] for name in variants}
    target = curves["GRPO (upstream settings)"][-1]
    rows = []
    for name, curve in curves.items():
        costs = [fe for fe, _ in results[(name, seeds[0])][0]]
        reached = next((fe for fe, reward in zip(costs, curve) if reward >= target), None)
        rows.append([name, f"{curve[0]:.4f}", f"{curve[-1]:.4f}", f"{max(curve):.4f}",
                     f"{reached:.3g}" if reached is not None else "not reached"])
    print(f"\nmean over seeds {seeds}; target = GRPO's mean final {target:.4f}")
    print(common.table(["variant", "mean before", "mean after", "best mean", "forward-eq to the target"], rows))


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reward", default="world_identity_soft", help="the one reward trained and evaluated")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (GRPO upstream is always run: it sets the target)")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in VARIANTS
              if name in args.variants or name == "GRPO (upstream settings)"}
    if args.full and args.seeds == [0]:
        args.seeds = [0, 1, 2]
    common.setup(args)
    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (preset, overrides) in chosen.items():
            cost = per_epoch_cost(preset, overrides)
            for seed in args.seeds:
                curve, seconds = run(name, preset, overrides, seed, args, Path(folder) / f"{len(results)}")
                # Optimizer steps per epoch are the same for every variant (1 with the tiny-world presets), so
                # step s of the curve is after s epochs of sampling and training.
                steps_per_epoch = max(curve[-1][0], 1) / args.epochs
                results[(name, seed)] = ([(step / steps_per_epoch * cost, reward) for step, reward in curve],
                                         seconds, cost)
                print(f"  {name}, seed {seed}: {curve[0][1]:.4f} -> {curve[-1][1]:.4f} in {seconds:.0f} s", flush=True)

    rows = []
    for seed in args.seeds:
        target = results[("GRPO (upstream settings)", seed)][0][-1][1]
        for name in chosen:
            points, seconds, cost = results[(name, seed)]
            reached = next((fe for fe, reward in points if reward >= target), None)
            total = points[-1][0]
            rows.append([name, seed, f"{points[0][1]:.4f}", f"{points[-1][1]:.4f}", cost,
                         f"{reached:.3g}" if reached is not None else "not reached",
                         f"{reached / total * seconds:.0f}" if reached is not None else "-", f"{seconds:.0f}"])
    print(f"\n{args.epochs} epochs, eval every {args.eval_every} (deterministic eval, test rows), reward {args.reward}")
    print(common.table(["variant", "seed", "eval before", "eval after", "forward-eq / epoch",
                        "forward-eq to GRPO's final", "~s to GRPO's final", "run s"], rows))
    if len(args.seeds) > 1:
        print_seed_means(results, chosen, args.seeds)
    (args.out / "algorithms.json").write_text(json.dumps(
        [{"variant": name, "seed": seed, "curve": points, "seconds": seconds, "forward_eq_per_epoch": cost}
         for (name, seed), (points, seconds, cost) in results.items()], indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (name, seed), (points, _, _) in results.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} (seed {seed})")
    axis.set_xlabel("transformer forward-equivalents (backward = 2)")
    axis.set_ylabel(f"eval {args.reward}")
    axis.set_title("tiny world: reward vs cost")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out / "algorithms.png", dpi=110)
    print(f"plot: {args.out / 'algorithms.png'}")


if __name__ == "__main__":
    main()
