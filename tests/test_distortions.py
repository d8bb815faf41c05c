"""Synthetic preference pairs: each distortion changes what it claims to, and only that."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from vace_reward.data import read_preference_csv, read_video, write_video
from vace_reward.distortions import brightness_shift, build_synthetic_pairs, degrade_region, temporal_drift


def random_video(seed, frames=9, height=32, width=48):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, height, width, 3), dtype=torch.uint8, generator=generator)


def test_degrade_region_changes_only_the_box():
    video = random_video(0)
    out = degrade_region(video, box=(0.25, 0.25, 0.75, 0.75), block=4, blur_kernel=3)
    inside = (slice(None), slice(8, 24), slice(12, 36))  # rows 0.25-0.75 of 32, columns of 48
    outside = torch.ones(32, 48, dtype=torch.bool)
    outside[8:24, 12:36] = False
    assert torch.equal(out[:, outside], video[:, outside])
    # Random pixels inside lose most of their detail: the spatial std drops several-fold.
    assert out[inside].float().std(dim=(1, 2)).mean() < 0.5 * video[inside].float().std(dim=(1, 2)).mean()
    with pytest.raises(ValueError, match="face box"):
        degrade_region(video, box=(0.5, 0.2, 0.4, 0.9))


def test_temporal_drift_starts_on_the_original_and_ends_on_the_other():
    video, other = random_video(0), random_video(1, frames=5, height=16, width=24)
    out = temporal_drift(video, other, drift_start=0.5)
    # a_t = clamp((t / 8 - 0.5) / 0.5, 0, 1): frames 0-4 untouched, frame 8 fully the other video.
    assert torch.equal(out[:5], video[:5])
    resized_last = torch.nn.functional.interpolate(other[-1:].permute(0, 3, 1, 2).float(), size=(32, 48),
                                                   mode="bilinear", align_corners=False)
    assert torch.equal(out[-1], resized_last.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0))
    # Frame 6 has a = (6/8 - 0.5) / 0.5 = 0.5 and shows other[round(6 * 4 / 8)] = other[3].
    other_6 = torch.nn.functional.interpolate(other[3:4].permute(0, 3, 1, 2).float(), size=(32, 48),
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    expected_6 = (0.5 * video[6].float() + 0.5 * other_6).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out[6], expected_6)
    distance_to_original = (out[5:].float() - video[5:].float()).abs().mean(dim=(1, 2, 3))
    assert bool((distance_to_original[1:] > distance_to_original[:-1]).all()), distance_to_original


def test_brightness_shift_is_small_and_saturates():
    video = torch.tensor([[[[0, 128, 253]]]], dtype=torch.uint8)
    assert brightness_shift(video, 6.0).tolist() == [[[[6, 134, 255]]]]


@pytest.fixture()
def source_csv(tmp_path):
    """Three videos of three 'people' (different reference images)."""
    with open(tmp_path / "videos.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ref_paths", "video", "prompt"])
        for index in range(3):
            Image.new("RGB", (20, 20), (60 * index, 100, 200 - 50 * index)).save(tmp_path / f"face{index}.png")
            write_video(tmp_path / f"clip{index}.mp4", random_video(index, frames=6, height=32, width=32))
            writer.writerow([f"face{index}.png", f"clip{index}.mp4", f"person {index}"])
    return tmp_path / "videos.csv"


def test_build_synthetic_pairs(source_csv, tmp_path):
    pairs = build_synthetic_pairs(source_csv, tmp_path / "out",
                                  ("identity_swap", "face_degradation", "temporal_drift", "near_duplicate"), seed=0)
    assert len(pairs) == 3 * 4
    read = read_preference_csv(tmp_path / "out" / "pairs.csv")
    assert [(p.video_a.name, p.video_b.name, p.target) for p in read] == \
        [(p.video_a.name, p.video_b.name, p.target) for p in pairs]
    originals = {f"clip{index}.mp4": index for index in range(3)}
    for pair in read:
        row = int(pair.prompt.split()[-1])
        assert pair.reference_paths[0].name == f"face{row}.png"
        chosen, rejected = (pair.video_a, pair.video_b) if pair.target >= 0.5 else (pair.video_b, pair.video_a)
        if pair.target == 0.5:  # near_duplicate: the original against a brightened copy
            assert {chosen.name, rejected.name} == {f"clip{row}.mp4", f"{row:05d}_near_duplicate.mp4"}
            continue
        # The preferred video is always the row's own original ...
        assert chosen.name == f"clip{row}.mp4"
        # ... and the rejected one is another person's clip or a distorted copy of this one.
        assert originals.get(rejected.name, row) != row or rejected.name.startswith(f"{row:05d}_")
    decisive = [p.target for p in read if p.target != 0.5]
    assert 0 < sum(decisive) < len(decisive)  # both A and B labels occur
    degraded, _ = read_video(tmp_path / "out" / "videos" / "00000_face_degradation.mp4")
    assert degraded.shape == (6, 32, 32, 3)


def test_identity_swap_needs_two_people(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "face.png")
    write_video(tmp_path / "clip.mp4", random_video(0, frames=4, height=16, width=16))
    (tmp_path / "videos.csv").write_text("ref_paths,video,prompt\nface.png,clip.mp4,a\nface.png,clip.mp4,b\n")
    with pytest.raises(ValueError, match="two different reference sets"):
        build_synthetic_pairs(tmp_path / "videos.csv", tmp_path / "out", ("identity_swap",))
