"""Where one epoch's time goes: transformer forward, backward, VAE encode / decode, text
encoding, reward, optimizer, and "other" (Python, copies, bookkeeping; target <= 5 %).

Runs the train script's own ``sample_epoch -> assign_advantages -> train_epoch`` on parts built
as ``train()`` builds them, with timers around the module calls (forward pre/post hooks on the
transformer and text encoder, wrappers on ``vae.encode`` / ``vae.decode``,
``accelerator.backward`` and ``optimizer.step``). Rewards run in a worker thread overlapping the
next rollout; only the time the main thread WAITS for them counts in the epoch, their own time
is shown beside it. One warm-up epoch, then the median of ``--repeats`` epochs.

    python benchmarks/epoch_breakdown.py [--full]
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import Future

import common


class Timers:
    """Seconds per category on the main thread (nested calls are not double counted)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.main = threading.get_ident()
        self.active = None

    def wrap(self, category, fn):
        def timed(*args, **kwargs):
            if threading.get_ident() != self.main or self.active is not None:
                return fn(*args, **kwargs)
            self.active = category
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                common.synchronize()
                self.seconds[category] += time.perf_counter() - start
                self.active = None

        return timed

    def hook(self, module, category):
        starts = {}

        def pre(mod, args):
            if threading.get_ident() == self.main and self.active is None:
                self.active = category
                starts[id(mod)] = time.perf_counter()

        def post(mod, args, output):
            if id(mod) in starts:
                common.synchronize()
                self.seconds[category] += time.perf_counter() - starts.pop(id(mod))
                self.active = None

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class TimedExecutor:
    """The train script's reward executor, recording reward time and the main thread's wait."""

    def __init__(self, executor, timers: Timers):
        self.executor, self.timers = executor, timers
        self.reward_seconds = 0.0

    def submit(self, fn, *args):
        def run():
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.reward_seconds += time.perf_counter() - start

        inner = self.executor.submit(run)
        outer = Future()
        outer.result = self.timers.wrap("reward (main thread waiting)", inner.result)
        return outer

    def shutdown(self):
        self.executor.shutdown()


def instrument(parts):
    timers = Timers()
    timers.hook(parts.base_transformer, "transformer forward")
    timers.hook(parts.pipeline.pipe.text_encoder, "text encoder")
    vae = parts.pipeline.vae
    vae.encode = timers.wrap("VAE encode", vae.encode)
    vae.decode = timers.wrap("VAE decode", vae.decode)
    parts.accelerator.backward = timers.wrap("backward", parts.accelerator.backward)
    parts.optimizer.step = timers.wrap("optimizer step", parts.optimizer.step)
    parts.executor = TimedExecutor(parts.executor, timers)
    return timers


def configurations(full: bool):
    tiny = common.preset("tiny")
    tiny.eval_freq = tiny.save_freq = 0
    tiny.tracker = ""
    medium = common.preset("tiny")
    medium.eval_freq = medium.save_freq = 0
    medium.tracker = ""
    size = common.LARGE if full else common.MEDIUM
    for prefix in ("", "eval_"):
        medium[prefix + "height"], medium[prefix + "width"], medium[prefix + "frames"] = size.height, size.width, size.frames
    # The real presets' structure: several sampling batches of 4 videos an epoch, so each batch's
    # rewards overlap the next batch's rollout (the tiny preset samples one batch of 32).
    medium.sample.train_batch_size = 4
    medium.sample.num_image_per_prompt = 4
    medium.sample.num_batches_per_epoch = 4
    return [("tiny preset (1 sampling batch of 32)", tiny, common.TINY),
            (f"{size.name} ({size.height}x{size.width}x{size.frames}, {size.num_layers} layers, dim {size.dim}; "
             f"4 sampling batches of 4)", medium, size)]


CATEGORIES = ["transformer forward", "backward", "VAE encode", "VAE decode", "text encoder",
              "reward (main thread waiting)", "optimizer step"]


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    common.setup(args)
    repeats = args.repeats or 3
    script = common.train_script()
    for name, config, size in configurations(args.full):
        parts = common.build_training_parts(config, size)
        timers = instrument(parts)
        common.run_epoch(parts, 0, script)  # warm-up
        epochs = []
        for epoch in range(1, repeats + 1):
            timers.seconds.clear()
            parts.executor.reward_seconds = 0.0
            start = time.perf_counter()
            common.run_epoch(parts, epoch, script)
            wall = time.perf_counter() - start
            epochs.append((wall, dict(timers.seconds), parts.executor.reward_seconds))
        parts.executor.shutdown()
        epochs.sort(key=lambda item: item[0])
        wall, seconds, reward_seconds = epochs[len(epochs) // 2]
        other = wall - sum(seconds.values())
        rows = [[category, f"{seconds.get(category, 0.0) * 1e3:.0f}", f"{seconds.get(category, 0.0) / wall:.1%}"]
                for category in CATEGORIES]
        rows.append(["other (Python, copies, bookkeeping)", f"{other * 1e3:.0f}", f"{other / wall:.1%}"])
        rows.append(["epoch (wall)", f"{wall * 1e3:.0f}", "100%"])
        print(f"\n{name}: median of {repeats} epochs (by wall time); epoch walls "
              f"{', '.join(f'{e[0]:.2f}' for e in epochs)} s")
        print(common.table(["part", "ms", "share"], rows))
        print(f"reward time in its worker thread (overlaps sampling): {reward_seconds * 1e3:.0f} ms; "
              f"'other' {other / wall:.1%} (target <= 5%)", flush=True)


if __name__ == "__main__":
    main()
