"""Rewards on in-memory frames vs the upstream route: write each rollout to mp4 (imageio-ffmpeg,
H.264), decode it again (decord, as the reward model's file reader does) and score that.

Both routes are timed interleaved per batch; reported per video, with the score difference the
lossy mp4 round trip causes. Rewards: ``ref_tone`` and the tiny ``identity`` reward model
(``IdentityRewardScorer.score_frames`` vs ``score_videos``). Frames come from a tiny-model
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

FPS = 16


def write_mp4(path: Path, video: torch.Tensor) -> None:
    import imageio

    imageio.mimwrite(path, video.numpy(), fps=FPS, codec="libx264", quality=8, macro_block_size=16)


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
    ref_paths = [[str(dataset_refs[i % len(dataset_refs)])] for i in range(args.batch)]
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

            def via_file():
                for path, item in zip(paths, frames):
                    write_mp4(path, item)
                decoded = torch.stack([read_mp4(path) for path in paths])
                inputs = RewardInputs(frames=decoded, reference_images=refs, prompts=prompts)
                results["file"] = (ref_tone(inputs)["ref_tone"], scorer.score_videos([str(p) for p in paths], ref_paths, prompts)[:, 0])

            def encode_decode_only():
                for path, item in zip(paths, frames):
                    write_mp4(path, item)
                torch.stack([read_mp4(path) for path in paths])

            times = common.interleaved({"memory": in_memory, "file": via_file, "mp4 only": encode_decode_only}, repeats)
            tone_diff = (results["memory"][0] - results["file"][0]).abs()
            identity_diff = (results["memory"][1] - results["file"][1]).abs()
            identity_spread = results["memory"][1].std().item()
            per = {k: common.median(v) / args.batch * 1e3 for k, v in times.items()}
            rows.append([f"{height}x{width}x{num_frames}", f"{per['memory']:.1f}", f"{per['file']:.1f}",
                         f"{per['mp4 only']:.1f}", f"{common.paired_ratio(times['file'], times['memory']):.2f}",
                         f"{tone_diff.max().item():.2e}", f"{identity_diff.max().item():.2e}",
                         f"{identity_spread:.2e}"])
            print(f"  {height}x{width}x{num_frames}: memory {common.spread(times['memory'])}, "
                  f"file {common.spread(times['file'])} (batch of {args.batch})", flush=True)
    print(f"\nper video, batch {args.batch}, {repeats} interleaved repeats, medians; rewards ref_tone + tiny identity")
    print(common.table(["video", "in-memory ms/video", "mp4 route ms/video", "mp4 write+read only ms/video",
                        "ratio mp4/memory", "max |d ref_tone|", "max |d identity|", "identity std over batch"], rows))


if __name__ == "__main__":
    main()
