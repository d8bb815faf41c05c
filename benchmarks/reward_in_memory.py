"""Rewards on in-memory frames vs the upstream route: write each rollout to mp4 as upstream does
(diffusers ``export_to_video``, 10 fps, quality 7.5), decode it again (decord, as the reward
model's file reader does) and score that (``reward_model.mp4_roundtrip``).

Both routes are timed interleaved per batch; reported per video, with the score difference the
lossy mp4 round trip causes, and the difference the declared frame rate makes (16 fps, the
project's earlier default, vs 10, upstream's). Rewards: ``ref_tone`` and the tiny ``identity``
reward model (``IdentityRewardScorer.score_frames`` vs ``rewards.identity.score_via_mp4``). Frames come from a tiny-model
rollout; larger sizes upsample them (the reward model resizes frames to its own pixel bound,
so its cost hardly depends on the video size, while mp4 encode/decode does).

    python benchmarks/reward_in_memory.py [--full]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from identity_grpo.rewards import REGISTRY, RewardInputs, build_reward_fn
from identity_grpo.rewards.identity import score_via_mp4, write_upstream_mp4

FPS = 10  # upstream's rollout videos (export_to_video's default)


def read_mp4(path: Path) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(str(path))
    return torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy())


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    common.setup(args)
    repeats = args.repeats or (7 if args.full else 5)
    sizes = [(32, 32, 5), (240, 416, 33)] + ([(480, 832, 81)] if args.full else [])

    config = common.on_tiny_models(common.preset("tiny"))
    config.reward_fn = {"ref_tone": 1.0, "identity": 1.0}
    build_reward_fn(config, common.device())  # registers the rewards, writes the tiny reward model if missing
    ref_tone = REGISTRY["ref_tone"](config, common.device())
    from vace_reward.inference import IdentityRewardScorer

    scorer = IdentityRewardScorer.from_pretrained(config.pretrained.reward_model, device=common.device())

    from identity_grpo.pipelines.vace import VaceRolloutPipeline

    pipeline = VaceRolloutPipeline(common.build_stock_pipeline(common.TINY))
    dataset_refs = sorted((common.REPO / "dataset" / "generated_img").glob("*.png"))
    refs = [[common.reference_images(len(dataset_refs))[i % len(dataset_refs)]] for i in range(args.batch)]
    prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(args.batch)]
    _, tiny_frames = pipeline(prompts, refs, height=32, width=32, num_frames=5, num_inference_steps=4,
                              guidance_scale=4.5, max_sequence_length=16, sde_steps=[],
                              latents=pipeline.prepare_latents(args.batch, 32, 32, 5, 1, torch.Generator().manual_seed(0)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for height, width, num_frames in sizes:
            # (B, F, H, W, 3): the tiny rollout stretched in time and space.
            video = tiny_frames.permute(0, 4, 1, 2, 3).float()
            video = F.interpolate(video, size=(num_frames, height, width), mode="trilinear")
            frames = video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()
            paths = [Path(folder, f"{height}x{width}_{i}.mp4") for i in range(args.batch)]
            results = {}

            def in_memory():
                inputs = RewardInputs(frames=frames, reference_images=refs, prompts=prompts)
                results["memory"] = (ref_tone(inputs)["ref_tone"], scorer.score_frames(frames, refs, prompts, fps=FPS)[:, 0])
                results["memory_16fps"] = scorer.score_frames(frames, refs, prompts, fps=16)[:, 0]

            def via_file():
                for path, item in zip(paths, frames):
                    write_upstream_mp4(item, path, FPS)
                decoded = torch.stack([read_mp4(path) for path in paths])
                inputs = RewardInputs(frames=frames, reference_images=refs, prompts=prompts)
                results["file"] = (ref_tone(RewardInputs(frames=decoded, reference_images=refs, prompts=prompts))["ref_tone"],
                                   score_via_mp4(scorer, inputs, FPS)[:, 0])

            def encode_decode_only():
                for path, item in zip(paths, frames):
                    write_upstream_mp4(item, path, FPS)
                torch.stack([read_mp4(path) for path in paths])

            times = common.interleaved({"memory": in_memory, "file": via_file, "mp4 only": encode_decode_only}, repeats)
            tone_diff = (results["memory"][0] - results["file"][0]).abs()
            identity_diff = (results["memory"][1] - results["file"][1]).abs()
            fps_diff = (results["memory"][1] - results["memory_16fps"]).abs()
            identity_spread = results["memory"][1].std().item()
            per = {k: common.median(v) / args.batch * 1e3 for k, v in times.items()}
            rows.append([f"{height}x{width}x{num_frames}", f"{per['memory']:.1f}", f"{per['file']:.1f}",
                         f"{per['mp4 only']:.1f}", f"{common.paired_ratio(times['file'], times['memory']):.2f}",
                         f"{tone_diff.max().item():.2e}", f"{identity_diff.max().item():.2e}",
                         f"{fps_diff.max().item():.2e}", f"{identity_spread:.2e}"])
            print(f"  {height}x{width}x{num_frames}: memory {common.spread(times['memory'])}, "
                  f"file {common.spread(times['file'])} (batch of {args.batch})", flush=True)
    print(f"\nper video, batch {args.batch}, {repeats} interleaved repeats, medians; rewards ref_tone + tiny identity")
    print(common.table(["video", "in-memory ms/video", "mp4 route ms/video", "mp4 write+read only ms/video",
                        "ratio mp4/memory", "max |d ref_tone| mp4", "max |d identity| mp4",
                        "max |d identity| 16 vs 10 fps", "identity std over batch"], rows))


if __name__ == "__main__":
    main()
