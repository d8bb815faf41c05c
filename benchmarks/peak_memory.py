"""Peak memory per configuration: tiny / medium model, rollout (one sampling batch) vs training
step (policy + KL reference + backward), gradient checkpointing off / on.

On CUDA: ``torch.cuda.max_memory_allocated`` per phase. On the CPU: the peak resident set size
above the process's RSS just before the phase, sampled every millisecond by a thread (one
subprocess per configuration, so freed-but-kept heap from an earlier phase does not hide a
later one).

    python benchmarks/peak_memory.py [--full]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import common
import torch


class PeakSampler:
    """Peak memory above the level at ``__enter__`` (MiB)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = common.current_rss_mb()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, common.current_rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.result = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, common.current_rss_mb())
            self.result = self.peak - self.base


def measure(size_name: str, checkpointing: bool, batch: int) -> dict:
    size = common.SIZES[size_name]
    config = common.on_tiny_models(common.preset("tiny"))
    for prefix in ("", "eval_"):
        config[prefix + "height"], config[prefix + "width"], config[prefix + "frames"] = size.height, size.width, size.frames
    config.sample.train_batch_size = batch
    config.sample.num_image_per_prompt = batch
    config.train.beta = 0.004  # with the KL reference, as the vace preset trains
    config.train.gradient_checkpointing = checkpointing
    parts = common.build_training_parts(config, size)
    script = common.train_script()
    parts.transformer.eval()
    loaded = common.current_rss_mb() if not torch.cuda.is_available() else torch.cuda.memory_allocated() / 2**20
    with PeakSampler() as rollout:
        batches = script.sample_epoch(0, config, parts.accelerator, parts.pipeline, parts.dataset, parts.sampler,
                                      parts.reward_fn, parts.executor)
    script.assign_advantages(batches, config, parts.accelerator)
    parts.transformer.train()
    # One recorded step as train_epoch runs it: policy, KL reference, loss, backward.
    rollouts = batches[0].rollouts
    with PeakSampler() as training, parts.accelerator.autocast():
        loss, _ = script.step_loss(config, parts.accelerator, parts.pipeline, parts.transformer, rollouts,
                                   batches[0].advantages, 0)
        parts.accelerator.backward(loss)
    parts.executor.shutdown()
    return {"loaded": loaded, "rollout": rollout.result, "train": training.result,
            "process_peak": common.peak_rss_mb()}


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--one", default="", help="internal: size,checkpointing,batch")
    args = parser.parse_args()
    if args.one:
        size, checkpointing, batch = args.one.split(",")
        print("RESULT " + json.dumps(measure(size, checkpointing == "1", int(batch))))
        return
    common.setup(args)
    sizes = ["tiny", "medium", "large"] if args.full else ["tiny", "medium"]
    batch = 8 if args.full else 4
    unit = "CUDA max allocated above start of phase" if torch.cuda.is_available() else "peak RSS above start of phase"
    rows = []
    for size in sizes:
        for checkpointing in (0, 1):
            command = [sys.executable, __file__, "--one", f"{size},{checkpointing},{batch}"]
            if args.threads:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
            rows.append([size, batch, "on" if checkpointing else "off", f"{result['loaded']:.0f}",
                         f"{result['rollout']:.1f}", f"{result['train']:.1f}", f"{result['process_peak']:.0f}"])
            print(f"  {size} checkpointing {'on' if checkpointing else 'off'}: {result}", flush=True)
    print(f"\nMiB; {unit}; training step = policy + KL reference + backward of one recorded step (CFG stacked)")
    print(common.table(["size", "batch", "grad ckpt", "after load", "rollout (+)", "train step (+)",
                        "process peak RSS"], rows))


if __name__ == "__main__":
    main()
