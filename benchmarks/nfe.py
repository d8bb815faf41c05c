"""Transformer calls (NFE) and batch elements per epoch, per rank: upstream-equivalent settings,
the ``vace`` preset, and the window / fast timestep-selection modes.

Analytic counts for the real preset (8 sampling batches of 4 videos per rank, 25 steps) are
printed first; then the same formulas are checked against forward-hook counts of one real
epoch (``sample_epoch -> assign_advantages -> train_epoch`` of the train script) on the tiny
models with the same per-rank step and batch structure (fewer sampling batches by default).

    python benchmarks/nfe.py [--full]     # --full counts all 8 sampling batches
"""

from __future__ import annotations

import math

import common


def trained_steps_of(config, step: int) -> list[int]:
    """The recorded (trained) steps of sampling step ``step``; falls back to the first
    ``num_train_steps`` on versions without ``trained_step_indices``."""
    try:
        from identity_grpo.configuration import trained_step_indices
    except ImportError:
        trained_step_indices = None
    if trained_step_indices is not None:
        return trained_step_indices(config, step)
    return list(range(max(1, math.floor(config.sample.num_steps * config.train.timestep_fraction))))


def analytic(config, mode: str, groups_per_batch: int = 1) -> dict[str, int]:
    """Calls and batch elements per epoch on one rank.

    ``mode``: "upstream" (cond and uncond as two calls per step; KL reference two more per
    trained step), "stock" (diffusers' sampler, one video per call), or "ours" (stacked CFG:
    one call per step, twice the elements; KL reference one more call per trained step).
    """
    sample, train = config.sample, config.train
    batch, steps, batches = sample.train_batch_size, sample.num_steps, sample.num_batches_per_epoch
    cfg = 2 if sample.guidance_scale > 1.0 else 1
    reference = 1 if train.beta > 0 else 0
    if config.get("algorithm", "grpo") != "grpo":
        return _forward_process_counts(config, batch, steps, batches, cfg, reference)
    window = sample.get("sde_window_size", 0)
    fast = sample.get("fast_branch", False)
    trained = [len(trained_steps_of(config, b)) for b in range(batches)]
    if mode == "upstream":
        rollout_calls = batches * steps * cfg
        rollout_elements = rollout_calls * batch
        train_calls = sum(trained) * cfg * (1 + reference) * train.num_inner_epochs
        train_elements = train_calls * batch
    elif mode == "stock":
        rollout_calls = rollout_elements = batches * batch * steps * cfg
        train_calls = train_elements = 0
    else:
        rollout_calls = batches * steps
        if fast and window:
            rollout_elements = sum(
                cfg * (start * groups_per_batch + (steps - start) * batch)
                for start in (trained_steps_of(config, b)[0] for b in range(batches)))
        else:
            rollout_elements = rollout_calls * batch * cfg
        train_calls = sum(trained) * (1 + reference) * train.num_inner_epochs
        train_elements = train_calls * batch * cfg
    # One backward pass per trained step, on the policy's elements (the KL reference has none).
    backward_elements = train_elements // (1 + reference)
    return _with_totals(rollout_calls, rollout_elements, train_calls, train_elements, backward_elements)


def _forward_process_counts(config, batch, steps, batches, cfg, reference) -> dict[str, int]:
    """DiffusionNFT: deterministic rollouts (one call per step, CFG only if guidance > 1); per
    trained timestep the conditional calls of the old adapter, the policy and the frozen base
    (when ``train.beta > 0``), and one backward pass of the policy. EvoID adds the initial model
    (always) and the T2V teacher (video frames only, counted as whole elements)."""
    from identity_grpo.configuration import num_train_steps

    timesteps = num_train_steps(config) * config.train.num_inner_epochs
    evoid = config.algorithm == "evoid"
    rollout_calls = batches * steps
    train_calls = batches * timesteps * (2 + (1 if evoid else reference) + (1 if evoid else 0))
    return _with_totals(rollout_calls, rollout_calls * batch * cfg, train_calls, train_calls * batch,
                        batches * timesteps * batch)


def _with_totals(rollout_calls, rollout_elements, train_calls, train_elements, backward_elements) -> dict[str, int]:
    """Adds totals and forward-equivalents (batch elements of forward calls, a backward pass counting 2)."""
    return {"rollout_calls": rollout_calls, "rollout_elements": rollout_elements, "train_calls": train_calls,
            "train_elements": train_elements, "total_calls": rollout_calls + train_calls,
            "total_elements": rollout_elements + train_elements,
            "forward_equivalents": rollout_elements + train_elements + 2 * backward_elements}


def variants(window_size: int) -> dict[str, object]:
    """name -> config (None when the config has no such field yet)."""
    out = {"upstream-equivalent": common.preset("vace"), "vace preset": common.preset("vace")}
    window = common.preset("vace")
    if "sde_window_size" in window.sample:
        window.sample.sde_window_size = window_size
        out[f"window {window_size}"] = window
        fast = common.preset("vace")
        fast.sample.sde_window_size = window_size
        fast.sample.fast_branch = True
        if "same_latent" in fast.sample:
            fast.sample.same_latent = True
        out[f"fast (window {window_size})"] = fast
    else:
        out[f"window {window_size}"] = None
        out[f"fast (window {window_size})"] = None
    if "algorithm" in common.preset("vace"):
        out["vace_nft preset"] = common.preset("vace_nft")
        out["vace_evoid preset"] = common.preset("vace_evoid")
        # CFG-free collection, so Phantom's three guidance branches never run: the same counts.
        out["phantom_nft preset"] = common.preset("phantom_nft")
        out["phantom_evoid preset"] = common.preset("phantom_evoid")
    return out


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=4, help="sde_window_size of the window / fast rows")
    args = parser.parse_args()
    common.setup(args)
    configs = variants(args.window)
    keys = ["rollout_calls", "rollout_elements", "train_calls", "train_elements", "total_calls", "total_elements",
            "forward_equivalents"]

    print("\nANALYTIC, real presets per rank: 8 sampling batches x 4 videos; vace: 25 steps, CFG 4.5, beta 0.004; "
          "vace_nft: 10 deterministic steps, CFG-free, 9 trained timesteps, beta 1e-4")
    rows = []
    for name, config in configs.items():
        if config is None:
            rows.append([name] + ["n/a (config field absent)"] + [""] * (len(keys) - 1))
            continue
        mode = "upstream" if name.startswith("upstream") else "ours"
        counts = analytic(config, mode)
        rows.append([name] + [counts[k] for k in keys])
    stock = analytic(configs["vace preset"], "stock")
    rows.append(["stock diffusers sampler (rollout only)"] + [stock[k] for k in keys])
    print(common.table(["settings"] + keys, rows))
    upstream = rows[0]
    print("ratios to upstream-equivalent (total calls): " + ", ".join(
        f"{row[0]} {row[5] / upstream[5]:.3f}" for row in rows[1:-1] if isinstance(row[5], int)))

    print("\nCOUNTED on the tiny models, one real epoch per row (train script's functions), same per-rank "
          "structure: 4 videos per batch = one group (K = 4), "
          f"{'8' if args.full else '2'} sampling batches, 25 steps")
    script = common.train_script()
    rows = []
    for name, config in configs.items():
        # The harness builds VACE models; the Phantom rows are analytic only.
        if config is None or name.startswith("upstream") or config.model_type == "phantom":
            continue
        common.on_tiny_models(config)
        config.sample.num_image_per_prompt = 4
        config.sample.num_batches_per_epoch = 8 if args.full else 2
        config.train.gradient_accumulation_steps = config.sample.num_batches_per_epoch
        parts = common.build_training_parts(config)
        counter = common.CallCounter(parts.base_transformer)
        parts.transformer.eval()
        batches = script.sample_epoch(0, config, parts.accelerator, parts.pipeline, parts.dataset, parts.sampler,
                                      parts.reward_fn, parts.executor)
        rollout = (counter.calls, counter.elements)
        counter.reset()
        script.assign_advantages(batches, config, parts.accelerator)
        parts.transformer.train()
        script.train_epoch(0, 0, config, parts.accelerator, parts.pipeline, parts.transformer, parts.optimizer,
                           parts.ema, batches)
        trained = (counter.calls, counter.elements)
        counter.remove()
        parts.executor.shutdown()
        expected = analytic(config, "ours", groups_per_batch=1)
        counted = {"rollout_calls": rollout[0], "rollout_elements": rollout[1], "train_calls": trained[0],
                   "train_elements": trained[1]}
        match = all(counted[k] == expected[k] for k in counted)
        rows.append([name] + [f"{counted[k]} / {expected[k]}" for k in counted] + ["yes" if match else "NO"])
        print(f"  {name}: done", flush=True)
    print(common.table(["settings (counted / analytic)", "rollout_calls", "rollout_elements", "train_calls",
                        "train_elements", "match"], rows))

    # The stock sampler's two calls per step, counted on one video.
    pipe = common.build_stock_pipeline(common.TINY)
    counter = common.CallCounter(pipe.transformer)
    pipe(prompt=common.PROMPTS[0], negative_prompt="", reference_images=common.reference_images(1), height=32,
         width=32, num_frames=5, num_inference_steps=25, guidance_scale=4.5, output_type="np", max_sequence_length=16)
    print(f"stock WanVACEPipeline, one video, 25 steps, CFG 4.5: {counter.calls} transformer calls, "
          f"{counter.elements} elements (analytic 50 / 50)")


if __name__ == "__main__":
    main()
