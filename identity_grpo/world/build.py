"""Train the tiny world's generators: a Wan VAE on its frames, then a Wan VACE transformer with
flow matching on (prompt, references) -> video latents, conditioned by the rollout pipeline's own
``encode_conditioning``, ``encode_prompts`` and ``predict_noise``; and on the same VAE and text
encoder a Phantom transformer (the Wan T2V architecture, references appended in time), trained
the same way through :class:`~identity_grpo.pipelines.phantom.PhantomRolloutPipeline`.

The text encoder is a tiny random UMT5 over the world's words, left frozen as the real one is.
Everything is seeded; on one machine two builds give identical weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from identity_grpo.world.render import (
    IDENTITIES,
    Identity,
    Scene,
    render_frame,
    render_reference,
    render_video,
    sample_scene,
)

logger = logging.getLogger(__name__)

WORLD_VOCAB = ["a", "man", "woman", "two", "men", "women", "and", "walks", "walk", "stands", "stand", "still",
               "to", "the", "left", "right", "in", "park", "by", "sea", "at", "night"]
Z_DIM = 8
SPATIAL_SCALE = 4  # the VAE's spatial compression (build_vae)
TEXT_DIM = 32


@dataclass
class WorldSize:
    """Video size of the world (the transformer's rope and the VAE are built for it)."""

    size: int = 32
    num_frames: int = 5


@dataclass
class BuildSettings:
    """How long each model trains; the defaults are the best settings measured so far (docs/tiny_world.md)."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_lr: float = 5e-4  # 1e-3 and above collapse to the mean colour (measured)
    num_scenes: int = 1536
    transformer_steps: int = 1800
    transformer_batch: int = 16
    transformer_lr: float = 1e-3
    transformer_heads: int = 8  # of width 16: 128 wide (64 wide followed references at a third the rate)
    transformer_layers: int = 4
    prompt_dropout: float = 0.1
    max_sequence_length: int = 16


def _to_unit(video: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> ``(3, F, H, W)`` float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def build_text_components(seed: int):
    from identity_grpo.testing import build_text_encoder, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(WORLD_VOCAB)
    return tokenizer, build_text_encoder(len(tokenizer))


def build_vae():
    from diffusers import AutoencoderKLWan

    # Two down-sampling stages, both also in time: 4x spatial (not Wan's 8x) and 4x temporal
    # compression. At 32x32 a face is 8 pixels wide; 8x compression leaves it one latent pixel and
    # loses the hair style (measured: a VAE round trip kept half the identities), 4x keeps it.
    # scale_factor_*: what WanPipeline (Phantom) reads; WanVACEPipeline derives them from the stages.
    return AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], scale_factor_spatial=SPATIAL_SCALE,
                            scale_factor_temporal=4)


def build_transformer(settings: BuildSettings):
    from diffusers import WanVACETransformer3DModel

    width = 16 * settings.transformer_heads
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=settings.transformer_heads, attention_head_dim=16,
        in_channels=Z_DIM, out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=4 * width,
        num_layers=settings.transformer_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=32, vace_layers=list(range(0, settings.transformer_layers, 2)),
        vace_in_channels=2 * Z_DIM + SPATIAL_SCALE ** 2,  # inactive, reactive latents and the VACE mask
    )


def reference_canvas(identity: Identity, size: int) -> np.ndarray:
    """The reference as the VAE sees it in the pipeline: the portrait fitted to the video size."""
    return np.asarray(render_reference(identity).resize((size, size), Image.BICUBIC))


def make_keyframe_codec(vae) -> None:
    """Set the temporal weights of a Wan VAE so that it is an image autoencoder applied to key frames.

    Every causal 3x3x3 convolution keeps only its current-frame slice (the two past-frame slices
    are zeroed), the encoder's strided time convolutions pick the last frame of their window, and
    the decoder's frame-doubling convolutions copy the current frame twice. Then latent frame 0
    encodes frame 0 and latent frame k > 0 encodes frame 4k, and decoding repeats it over frames
    4k-3 .. 4k: a key-frame codec with the real class, shapes and chunked caching. Training it
    on single frames (which never reach the past-frame slices or the time convolutions) keeps
    this structure, so the whole VAE trains at the cost of an image autoencoder.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = set()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResample) and hasattr(module, "time_conv"):
                conv = module.time_conv
                time_convs.add(conv)
                conv.weight.zero_()
                conv.bias.zero_()
                channels = conv.in_channels
                eye = torch.eye(channels)
                for copy in range(conv.out_channels // channels):  # 2 for upsampling, 1 for downsampling
                    conv.weight[copy * channels:(copy + 1) * channels, :, 2, 0, 0] = eye
        for module in vae.modules():
            if isinstance(module, WanCausalConv3d) and module not in time_convs and module.kernel_size[0] == 3:
                module.weight[:, :, :2].zero_()


@contextlib.contextmanager
def single_frame_convolutions():
    """Within this block a Wan causal convolution applied to ONE frame with no cache runs as the 2-D
    convolution of its current-frame kernel slice: the same numbers (the causal padding puts zeros
    under the other slices) at a third of the cost, which makes image training of the VAE fast."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if x.shape[2] != 1 or cache_x is not None:
            return original(self, x, cache_x)
        padded = F.pad(x[:, :, 0], self._padding[:4])
        return F.conv2d(padded, self.weight[:, :, -1], self.bias, stride=self.stride[1:])[:, :, None]

    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = original


def train_vae(settings: BuildSettings, size: WorldSize):
    """The Wan VAE as a key-frame codec (:func:`make_keyframe_codec`) trained to reconstruct world
    frames and reference canvases (MSE + a light KL); its ``latents_mean`` / ``latents_std`` are
    then set from the encoded training data."""
    torch.manual_seed(settings.seed)
    vae = build_vae()
    make_keyframe_codec(vae)
    vae.train()
    rng = np.random.default_rng(settings.seed)
    canvases = torch.stack([_to_unit(reference_canvas(i, size.size)[None]) for i in IDENTITIES])

    def frames(count: int) -> torch.Tensor:
        """``(count, 3, 1, H, W)`` key frames (0 or a multiple of 4) of random scenes."""
        keys = list(range(0, size.num_frames, 4))

        def key_frame() -> np.ndarray:
            scene = sample_scene(rng, IDENTITIES, size.num_frames)
            return render_frame(scene, keys[int(rng.integers(len(keys)))], size.size, size.num_frames)

        return torch.stack([_to_unit(key_frame()[None]) for _ in range(count)])

    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * min(1.0, 2.0 * (1.0 - step / settings.vae_steps)))
    start = time.time()
    for step in range(settings.vae_steps):
        refs = canvases[torch.from_numpy(rng.choice(len(IDENTITIES), settings.vae_batch // 4, replace=False))]
        pixels = torch.cat([frames(settings.vae_batch - len(refs)), refs])
        with single_frame_convolutions():
            latents = vae.encode(pixels).latent_dist.mode()
            reconstruction = vae.decode(latents).sample
        # A plain autoencoder (the posterior's mode, no KL): a KL term strong enough to matter
        # drowns a tiny latent in noise, and the latents are standardised afterwards anyway.
        loss = F.mse_loss(reconstruction, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == settings.vae_steps - 1:
            logger.info("vae step %d/%d loss %.4f (%.0f s)", step + 1, settings.vae_steps, loss.item(),
                        time.time() - start)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(frames(128)).latent_dist.mode(), vae.encode(canvases).latent_dist.mode()])
    latents = latents.transpose(0, 1).flatten(1)
    vae.register_to_config(latents_mean=latents.mean(dim=1).tolist(), latents_std=latents.std(dim=1).tolist())
    return vae


def build_phantom_transformer(settings: BuildSettings):
    """The Phantom generator's transformer: :func:`build_transformer`'s sizes without the VACE
    blocks (Phantom-Wan's DiT is the Wan T2V architecture; its references enter as latent frames)."""
    from diffusers import WanTransformer3DModel

    width = 16 * settings.transformer_heads
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=settings.transformer_heads, attention_head_dim=16,
        in_channels=Z_DIM, out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=4 * width,
        num_layers=settings.transformer_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=32,
    )


@dataclass
class EncodedScenes:
    """Training data of the transformer, for scenes of one reference count n.

    Attributes:
        clean: the rollout state's clean latents: VACE ``(N, z, n + F_lat, h, w)``, the references'
            then the video's; Phantom ``(N, z, F_lat, h, w)``, the video's only.
        conditioning: the pipeline's ``encode_conditioning``: VACE's control latents
            ``(N, 2z + 16, n + F_lat, h, w)``, Phantom's clean reference latents ``(N, z, n, h, w)``.
        prompt_embeds: ``(N, L, D)`` UMT5 embeddings.
    """

    clean: torch.Tensor
    conditioning: torch.Tensor
    prompt_embeds: torch.Tensor


@torch.no_grad()
def encode_scenes(pipeline, scenes: list[Scene], references: dict[str, Image.Image], size: WorldSize,
                  max_sequence_length: int, batch: int = 64) -> EncodedScenes:
    """Encode scenes of one reference count exactly as a rollout conditions the transformer."""
    parts = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        pixels = torch.stack([_to_unit(render_video(scene, size.size, size.num_frames)) for scene in chunk])
        video = pipeline._vae_encode(pixels)
        refs = [[references[person.name] for person in scene.people] for scene in chunk]
        conditioning = pipeline.encode_conditioning(refs, size.size, size.size, size.num_frames)
        count = len(chunk[0].people)
        # The rollout state: Phantom's holds the video only (it appends the references at every
        # call); VACE's holds the references' slots (clean value: their inactive latents) first.
        if pipeline.video_frames(count) == slice(None):
            clean = video
        else:
            clean = torch.cat([conditioning[:, :Z_DIM, :count].float(), video], dim=2)
        embeds = pipeline.encode_prompts([scene.prompt for scene in chunk], max_sequence_length)
        parts.append((clean, conditioning, embeds))
    return EncodedScenes(*(torch.cat(tensors) for tensors in zip(*parts)))


def flow_matching_sigmas(generator: torch.Generator, count: int, shift: float) -> torch.Tensor:
    """Noise levels drawn as the sampler spaces them: uniform u, shifted ``s u / (1 + (s - 1) u)``."""
    u = torch.rand(count, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


def train_transformer(pipeline, data: list[EncodedScenes], settings: BuildSettings, shift: float = 3.0):
    """Flow matching: ``x_t = (1 - s) x0 + s eps``, target velocity ``eps - x0`` at timestep
    ``1000 s``, the prompt replaced by the empty prompt's embedding with ``prompt_dropout`` (so
    classifier-free guidance has an unconditional model to subtract). The velocity is the rollout
    pipeline's own unguided ``predict_noise`` (VACE: control stream at scale 1; Phantom: clean
    reference frames appended, their slots' output dropped), so training and sampling condition
    the transformer alike."""
    transformer = pipeline.transformer.train()
    generator = torch.Generator().manual_seed(settings.seed)
    empty = pipeline.encode_prompts([""], settings.max_sequence_length)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=settings.transformer_lr, weight_decay=0.01)
    steps = settings.transformer_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 100) * min(1.0, 2.0 * (1.0 - step / steps)))
    start = time.time()
    for step in range(steps):
        bucket = data[step % len(data)]
        index = torch.randint(len(bucket.clean), (settings.transformer_batch,), generator=generator)
        clean = bucket.clean[index]
        noise = torch.randn(clean.shape, generator=generator)
        sigma = flow_matching_sigmas(generator, len(index), shift).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        drop = torch.rand(len(index), generator=generator) < settings.prompt_dropout
        text = torch.where(drop.view(-1, 1, 1), empty.expand(len(index), -1, -1), bucket.prompt_embeds[index])
        prediction = pipeline.predict_noise(noisy, sigma.flatten() * 1000, text, None, bucket.conditioning[index],
                                            guidance_scale=1.0)
        loss = F.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("transformer step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.time() - start)
    return transformer.eval()


def split_scenes(settings: BuildSettings, size: WorldSize) -> list[list[Scene]]:
    """``settings.num_scenes`` random scenes over all 24 people, bucketed by people count."""
    rng = np.random.default_rng(settings.seed + 1)
    scenes = [sample_scene(rng, IDENTITIES, size.num_frames) for _ in range(settings.num_scenes)]
    return [[scene for scene in scenes if len(scene.people) == count] for count in (1, 2)]


def build_generator(settings: BuildSettings, size: WorldSize, vae=None):
    """The world's ``WanVACEPipeline``: tiny UMT5 (random, frozen), the trained VAE (``vae`` if
    given), the Wan UniPC scheduler (shift 3) and the transformer trained here."""
    from diffusers import WanVACEPipeline

    from identity_grpo.pipelines.vace import VaceRolloutPipeline
    from identity_grpo.testing import build_wan_unipc_scheduler

    tokenizer, text_encoder = build_text_components(settings.seed)
    vae = vae if vae is not None else train_vae(settings, size)
    torch.manual_seed(settings.seed)
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                           transformer=build_transformer(settings), scheduler=build_wan_unipc_scheduler(3.0))
    fit_to_scenes(VaceRolloutPipeline(pipe), settings, size)
    return pipe


def build_phantom_generator(settings: BuildSettings, size: WorldSize, base):
    """The world's Phantom: a ``WanPipeline`` with the VACE generator ``base``'s tokenizer, UMT5,
    VAE and scheduler (Phantom-Wan shares Wan T2V's) and a Phantom transformer
    (:func:`build_phantom_transformer`) trained here on the same scenes, through
    :class:`~identity_grpo.pipelines.phantom.PhantomRolloutPipeline`. Its folder serves as both
    ``pretrained.model`` and ``pretrained.phantom_dit``."""
    from diffusers import WanPipeline

    from identity_grpo.pipelines.phantom import PhantomRolloutPipeline

    torch.manual_seed(settings.seed)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=build_phantom_transformer(settings), scheduler=base.scheduler)
    fit_to_scenes(PhantomRolloutPipeline(pipe), settings, size)
    return pipe


def fit_to_scenes(rollout, settings: BuildSettings, size: WorldSize) -> None:
    """Encode the world's training scenes (:func:`split_scenes`) as ``rollout`` conditions its
    transformer and train the transformer on them (:func:`train_transformer`)."""
    references = {identity.name: render_reference(identity) for identity in IDENTITIES}
    start = time.time()
    data = [encode_scenes(rollout, bucket, references, size, settings.max_sequence_length)
            for bucket in split_scenes(settings, size)]
    logger.info("encoded %d scenes (%.0f s)", settings.num_scenes, time.time() - start)
    train_transformer(rollout, data, settings)


def write_dataset(out, seed: int = 0, num_train: int = 24, num_test: int = 32, size: WorldSize = WorldSize()) -> None:
    """``out/{train,test}.csv`` (``ref_paths,prompt``) and the 24 reference portraits. Test rows
    are new scenes (prompts and pairings) not among the training rows. Rows are drawn in one
    stream, training rows first, so a longer test split keeps the training rows and extends the
    test rows (the world's first 8 test rows are those of its first release)."""
    import csv
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for identity in IDENTITIES:
        render_reference(identity).save(out / f"{identity.name}.png")
    rng = np.random.default_rng(seed + 2)
    rows, seen = [], set()
    while len(rows) < num_train + num_test:
        scene = sample_scene(rng, IDENTITIES, size.num_frames)
        key = (tuple(person.name for person in scene.people), scene.prompt)
        if key not in seen:
            seen.add(key)
            rows.append(key)
    for split, chunk in (("train", rows[:num_train]), ("test", rows[num_train:])):
        with open(out / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ref_paths", "prompt"])
            for names, prompt in chunk:
                writer.writerow([";".join(f"{name}.png" for name in names), prompt])
