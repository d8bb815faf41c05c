"""OpenS2V-Eval's protocol pieces against numbers worked out by hand: frame indices, grey padding
and the largest-face retry, the Arc/Cur zero handling, Motion on translated patterns, and the
CurricularFace / aesthetic inputs with tiny stand-ins for the weights that cannot be had offline."""

import importlib.util

import numpy as np
import pytest
import torch

from identity_grpo.metrics.opens2v import (
    OpenS2VFaceSim,
    aesthetic_score,
    largest_face,
    opens2v_mean,
    pad_grey,
    sample_indices,
)
from identity_grpo.rewards.facesim import DetectedFace, MeanColorEmbedder, frame_indices

needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None,
                               reason="OpenCV is part of the 'faces' extra (bash scripts/install.sh dev)")

RED, BLUE, YELLOW = (255, 0, 0), (0, 0, 255), (255, 255, 0)


def test_frame_indices_truncate_like_numpy_linspace_with_dtype_int():
    # 80 k / 31 for k = 0..3 is 0, 2.58, 5.16, 7.74: truncated to 0, 2, 5, 7 (rounding gives 0, 3, 5, 8).
    indices = sample_indices(81)
    assert len(indices) == 32 and indices[:4] == [0, 2, 5, 7] and indices[-1] == 80
    assert frame_indices(81, 32)[:4] == [0, 3, 5, 8]  # the project's rounding, for contrast
    # Fewer frames than 32: indices repeat (3 k / 31 -> frame 0 eleven times, 1 and 2 ten times, 3 once).
    assert [sample_indices(4).count(f) for f in range(4)] == [11, 10, 10, 1]
    assert sample_indices(5, None) == [0, 1, 2, 3, 4]


def test_pad_grey_pads_a_quarter_of_each_side_with_128():
    image = np.full((4, 8, 3), 7, dtype=np.uint8)
    padded, (left, top) = pad_grey(image)
    assert (left, top) == (2, 1) and padded.shape == (6, 12, 3)
    assert (padded[1:5, 2:10] == 7).all()
    assert (padded[0] == 128).all() and (padded[:, :2] == 128).all() and (padded[:, 10:] == 128).all()


class BlobDetector:
    """Stand-in detector: one face per distinct non-black colour, its box the colour's bounding box;
    like a real detector it misses a face that touches the image border."""

    def detect(self, image):
        faces = []
        for colour in {tuple(int(v) for v in p) for p in image.reshape(-1, 3)} - {(0, 0, 0), (128, 128, 128)}:
            ys, xs = np.nonzero((image == colour).all(axis=-1))
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            if box[0] > 0 and box[1] > 0 and box[2] < image.shape[1] and box[3] < image.shape[0]:
                keypoints = np.array([[box[0], box[1]]] * 5, dtype=np.float32)
                faces.append(DetectedFace(box, 1.0, keypoints))
        return sorted(faces, key=lambda f: -f.area)


def _canvas(*squares, size=32):
    """A black ``size x size`` RGB frame with (colour, y0, x0, side) squares."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    for colour, y0, x0, side in squares:
        frame[y0:y0 + side, x0:x0 + side] = colour
    return frame


def test_largest_face_and_the_grey_padding_retry():
    found = largest_face(BlobDetector(), _canvas((RED, 4, 4, 16), (BLUE, 24, 24, 4)))
    assert found.face.box == (4.0, 4.0, 20.0, 20.0) and found.original is found.face
    # A face touching the border is missed, then found in the padded image (8 px of grey each side)
    # and mapped back: box and keypoints shift by (-8, -8).
    touching = _canvas((RED, 0, 0, 10))
    found = largest_face(BlobDetector(), touching)
    assert found.image.shape == (48, 48, 3)
    assert found.face.box == (8.0, 8.0, 18.0, 18.0) and found.original.box == (0.0, 0.0, 10.0, 10.0)
    assert found.original.keypoints[0].tolist() == [0.0, 0.0]
    assert largest_face(BlobDetector(), _canvas()) is None


def test_zero_handling_arc_keeps_clipped_zeros_cur_drops_them():
    similarities = [0.5, None, -0.2, 0.8]
    assert opens2v_mean(similarities, drop_zeros=False) == pytest.approx((0.5 + 0.0 + 0.8) / 3)
    assert opens2v_mean(similarities, drop_zeros=True) == pytest.approx((0.5 + 0.8) / 2)
    assert opens2v_mean([None, None], drop_zeros=False) == 0.0


def test_facesim_protocol_scores_the_largest_face_of_32_sampled_frames():
    frames = np.stack([
        _canvas((RED, 4, 4, 16), (BLUE, 24, 24, 4)),   # largest face red
        _canvas((BLUE, 4, 4, 16), (RED, 24, 24, 4)),   # largest face blue
        _canvas(),                                      # no face: skipped
        _canvas((YELLOW, 4, 4, 16)),                    # yellow
    ])
    references = [_canvas((RED, 8, 8, 8)), _canvas((BLUE, 8, 8, 8))]
    # MeanColorEmbedder's chroma cosines: red-blue -0.5, red-yellow 0.5, blue-yellow -0.5.
    # 32 indices over 4 frames weight them 11, 10, 10 (skipped), 1.
    # Red: Arc (zeros kept) (11 * 1 + 10 * 0 + 1 * 0.5) / 22; Cur (zeros dropped) (11 * 1 + 0.5) / 12.
    # Blue: Arc (11 * 0 + 10 * 1 + 1 * 0) / 22; Cur 10 / 10.
    metric = OpenS2VFaceSim(BlobDetector(), MeanColorEmbedder(), cur_embedder=MeanColorEmbedder())
    scores = metric.score(frames, references)
    assert scores.arc == pytest.approx([11.5 / 22, 10 / 22])
    assert scores.cur == pytest.approx([11.5 / 12, 1.0])
    assert (scores.face_frames, scores.num_frames) == (22, 32)
    with pytest.raises(ValueError, match="reference image 1"):
        metric.score(frames, [references[0], _canvas()])


@pytest.mark.skipif(importlib.util.find_spec("insightface") is None or importlib.util.find_spec("cv2") is None,
                    reason="insightface (norm_crop) and OpenCV come with bash scripts/install.sh dev")
def test_curricularface_input_is_the_aligned_224_crop_at_112_scaled_to_minus_one_one():
    from insightface.utils.face_align import arcface_dst

    from identity_grpo.metrics.opens2v import CurricularFaceEmbedder

    class ChannelMeans(torch.nn.Module):
        def forward(self, pixels):
            assert pixels.shape[1:] == (3, 112, 112)
            return pixels.mean(dim=(2, 3))

    # Keypoints on the ArcFace template scaled to 224 make norm_crop the identity on a 224 image.
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[..., 0], image[..., 2] = 255, 51
    face = DetectedFace((0.0, 0.0, 224.0, 224.0), 1.0, arcface_dst * 2)
    embedder = CurricularFaceEmbedder(ChannelMeans())
    assert np.abs(embedder.crops(image, [face])[0].astype(int) - image).max() <= 1
    # (x / 255 - 0.5) / 0.5 of (255, 0, 51) is (1, -1, -0.6), then L2-normalised.
    expected = torch.tensor([1.0, -1.0, -0.6]) / np.sqrt(2.36)
    assert embedder.embed(image, [face])[0] == pytest.approx(expected.tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="keypoints"):
        embedder.embed(image, [DetectedFace((0.0, 0.0, 10.0, 10.0), 1.0)])


def _translated(dx: int, dy: int, frames: int = 4) -> np.ndarray:
    """Grey frames of a smooth random texture moving ``(dx, dy)`` pixels a frame."""
    import cv2

    noise = np.random.default_rng(0).integers(0, 256, (128, 256)).astype(np.float32)
    texture = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 2.0), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    views = [texture[32 - dy * t:96 - dy * t, 64 - dx * t:192 - dx * t] for t in range(frames)]
    return np.stack([np.stack([view] * 3, axis=-1) for view in views])


@needs_cv2
@pytest.mark.parametrize("dx, dy, expected", [
    (2, 0, 1.0),     # |(2 + 0) / 2|
    (0, 2, 1.0),
    (2, 2, 2.0),
    (-3, 0, 1.5),    # the absolute value of the signed mean
    (2, -2, 0.0),    # opposite components cancel: OpenS2V's Motion is not a mean magnitude
    (0, 0, 0.0),
])
def test_motion_is_the_absolute_signed_mean_flow(dx, dy, expected):
    from identity_grpo.metrics.opens2v import farneback_motion

    # Measured: within 0.001 of the hand value for every case.
    assert farneback_motion(_translated(dx, dy)) == pytest.approx(expected, abs=0.01)


@needs_cv2
def test_motion_errors_name_the_problem():
    from identity_grpo.metrics.opens2v import farneback_motion

    with pytest.raises(ValueError, match="at least 2 frames"):
        farneback_motion(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        farneback_motion(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_aesthetic_score_normalises_embeddings_and_averages_32_sampled_frames():
    class Processor:  # stand-in: pixel values are the frames themselves
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.tensor(np.stack(images), dtype=torch.float32)}

    class Clip:  # stand-in: the "image embedding" of a constant frame of value v is (v, 1)
        def get_image_features(self, pixel_values):
            means = pixel_values.mean(dim=(1, 2, 3))
            return torch.stack([means, torch.ones_like(means)], dim=1)

    head = torch.nn.Linear(2, 1, bias=False)
    head.weight.data = torch.tensor([[10.0, 0.0]])
    frames = np.stack([np.full((2, 2, 3), v, dtype=np.uint8) for v in (0, 1, 2, 3)])
    # Normalised (v, 1) -> 10 v / sqrt(v^2 + 1); frames weighted 11, 10, 10, 1 by the 32 indices.
    per_frame = [10 * v / np.sqrt(v * v + 1) for v in (0, 1, 2, 3)]
    expected = float(np.dot([11, 10, 10, 1], per_frame) / 32)
    assert aesthetic_score(frames, Clip(), Processor(), head) == pytest.approx(expected, rel=1e-6)
