"""Batched SDE rollout (``VaceRolloutPipeline.__call__``) vs stock ``WanVACEPipeline.__call__``.

Same prompts, references, initial latents, steps, guidance and sizes. The stock pipeline makes
one video per call (two transformer calls per step for CFG, prompt and references encoded per
call); ours denoises B videos together with stacked CFG, records every SDE step, decodes once.
Prints seconds per video and the ratio ours / stock (< 1: ours is faster per video), at batch 1
and batch 4 (8 with --full), medians over interleaved repeats.

    python benchmarks/rollout_overhead.py [--size tiny|medium|large] [--full]
"""

from __future__ import annotations

import common
import torch

from identity_grpo.pipelines.vace import VaceRolloutPipeline


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(common.SIZES), default="",
                        help="model/video size (default: tiny and medium; --full adds large)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    common.setup(args)
    sizes = [args.size] if args.size else (["tiny", "medium", "large"] if args.full else ["tiny", "medium"])
    batches = [1, 4, 8] if args.full else [1, 4]
    repeats = args.repeats or (7 if args.full else 3)
    guidance, seq = 4.5, 16
    rows = []
    for name in sizes:
        size = common.SIZES[name]
        pipe = common.build_stock_pipeline(size)
        ours = VaceRolloutPipeline(pipe)
        for batch in batches:
            refs = [common.reference_images(1) for _ in range(batch)]
            prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(batch)]
            latents = ours.prepare_latents(batch, size.height, size.width, size.frames, 1, torch.Generator().manual_seed(0))
            kwargs = dict(height=size.height, width=size.width, num_frames=size.frames, num_inference_steps=args.steps,
                          guidance_scale=guidance, max_sequence_length=seq)

            def stock():
                for index in range(batch):
                    pipe(prompt=prompts[index], negative_prompt="", reference_images=refs[index],
                         latents=latents[index : index + 1].clone(), output_type="np", **kwargs)

            def batched_sde():
                ours(prompts, refs, latents=latents, generator=torch.Generator().manual_seed(1), **kwargs)

            def batched_ode():
                ours(prompts, refs, latents=latents, sde_steps=[], **kwargs)

            times = common.interleaved({"stock": stock, "ours_sde": batched_sde, "ours_ode": batched_ode}, repeats)
            stock_video = common.median(times["stock"]) / batch
            sde_video = common.median(times["ours_sde"]) / batch
            ode_video = common.median(times["ours_ode"]) / batch
            rows.append([name, batch, args.steps, f"{stock_video * 1e3:.1f}", f"{sde_video * 1e3:.1f}",
                         f"{ode_video * 1e3:.1f}", f"{common.paired_ratio(times['ours_sde'], times['stock']):.3f}",
                         f"{common.paired_ratio(times['ours_ode'], times['stock']):.3f}"])
            print(f"  {name} batch {batch}: stock {common.spread(times['stock'])}, ours SDE "
                  f"{common.spread(times['ours_sde'])}, ours ODE {common.spread(times['ours_ode'])} (whole batch)",
                  flush=True)
    print(f"\nper video, {repeats} interleaved repeats, medians; ratio = ours / stock per call pair (< 1 is faster)")
    print(common.table(["size", "batch", "steps", "stock ms/video", "ours SDE ms/video", "ours ODE ms/video",
                        "ratio SDE/stock", "ratio ODE/stock"], rows))
    print(f"peak RSS {common.peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
