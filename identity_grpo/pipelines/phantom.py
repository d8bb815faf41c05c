"""Batched Phantom-Wan rollouts with the SDE sampler, built from diffusers' Wan2.1-T2V components.

No diffusers pipeline exists for Phantom. Its DiT is the Wan2.1-T2V architecture
(``WanTransformer3DModel``); the tokenizer, UMT5 encoder, VAE and scheduler are Wan2.1-T2V's.
What makes it Phantom is the conditioning and the guidance, written here:

- Each reference image is fitted (aspect kept, centred) onto a white canvas of the video size,
  VAE-encoded as a one-frame video and normalised: one clean latent frame per reference,
  APPENDED AFTER the video latent frames along time, in input order. The transformer sees
  ``[noisy video frames, clean reference frames]``; its prediction for the reference slots is
  discarded.
- Three guidance branches per step, run as ONE transformer call on the stacked batch:
  ``pos_it`` (refs + prompt), ``pos_i`` (refs + negative prompt), ``neg`` (zero reference
  latents + negative prompt), combined as
  ``neg + s_img * (pos_i - neg) + s_text * (pos_it - pos_i)``.

What the SDE acts on (a choice, documented because it shapes the log-probs): only the video
frames. The reference frames are not part of the state; they are re-inserted clean before every
transformer call (Phantom's own loop also overwrites them every step, so the video trajectory is
the same). Hence in the :class:`Rollouts` record ``latents`` / ``next_latents`` hold video-frame
latents only, ``log_probs`` are means over video-frame elements only (the reference slots carry
no action, so counting them would only dilute the ratio with constants), and ``conditioning``
holds the clean reference latents ``(B, z, n, h, w)``.

The rollout object is a drop-in for :class:`~identity_grpo.pipelines.vace.VaceRolloutPipeline`:
both are :class:`~identity_grpo.pipelines.base.RolloutPipeline` subclasses, so ``__call__`` /
``rescore`` / ``prepare_latents`` / ``encode_prompts`` / ``negative_embeds`` and the ``Rollouts``
record and SDE step are the same code. Flow-GRPO-Fast's ``shared_prefix`` is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from identity_grpo.pipelines.base import RolloutPipeline

logger = logging.getLogger(__name__)

# Phantom-Wan's released sampling defaults.
DEFAULT_IMAGE_GUIDANCE_SCALE = 5.0
DEFAULT_TEXT_GUIDANCE_SCALE = 7.5
DEFAULT_FLOW_SHIFT = 5.0


def fit_on_white_canvas(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``(3, height, width)`` float32 in [-1, 1]: ``image`` resized with its aspect kept to fit the
    canvas, centred on white, by the official Phantom rule (``generate.py``, ``load_ref_images``):
    the side that fills the canvas is set, the other is TRUNCATED with ``int()``, LANCZOS, and the
    left/top padding is the floor half of the remainder."""
    image = image.convert("RGB")
    ratio = image.width / image.height
    if ratio > width / height:  # wider than the canvas: fill the width
        new_width, new_height = width, int(width / ratio)
    else:
        new_width, new_height = int(height * ratio), height
    new_width, new_height = max(1, new_width), max(1, new_height)
    resized = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(resized, ((width - new_width) // 2, (height - new_height) // 2))
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


class PhantomRolloutPipeline(RolloutPipeline):
    """Batched SDE/ODE sampling and re-scoring for a (LoRA-adapted) Phantom-Wan transformer.

    Args:
        pipe: a ``WanPipeline`` (Wan2.1-T2V components) whose ``transformer`` holds Phantom's
            weights; ``transformer`` may later be replaced by a peft / DDP-wrapped module.
        image_guidance_scale: ``s_img``, weight of ``pos_i - neg`` (how strongly the references act).
        text_guidance_scale: ``s_text``, weight of ``pos_it - pos_i`` (how strongly the prompt acts).
        dtype: compute dtype of the transformer inputs (the frozen weights' dtype).

    The ``guidance_scale`` argument of ``__call__`` / ``rescore`` only switches guidance on
    (``> 1``: the three-branch formula with the scales above) or off (``<= 1``: the single
    conditional branch, e.g. ``train.cfg = False``); it keeps the VACE pipeline's signature.
    """

    supports_shared_prefix = False

    def __init__(self, pipe, *, image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
                 text_guidance_scale: float = DEFAULT_TEXT_GUIDANCE_SCALE, dtype: torch.dtype | None = None):
        super().__init__(pipe, dtype)
        self.transformer_config = pipe.transformer.config
        self.image_guidance_scale = float(image_guidance_scale)
        self.text_guidance_scale = float(text_guidance_scale)

    # ------------------------------------------------------------------ 1. check inputs
    def check_inputs(self, prompts, reference_images, height, width, num_frames, conditioning_scale=1.0) -> int:
        """Validate a batch; returns its number of references per item."""
        count = super().check_inputs(prompts, reference_images, height, width, num_frames)
        self._check_conditioning_scale(conditioning_scale)
        return count

    def _check_call(self, prompts, reference_images, height, width, num_frames, conditioning_scale: float,
                    latents: torch.Tensor | None) -> int:
        count = self.check_inputs(prompts, reference_images, height, width, num_frames, conditioning_scale)
        expected_shape = self.latent_shape(len(prompts), height, width, num_frames)
        if latents is not None and tuple(latents.shape) != expected_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {expected_shape}: Phantom latents "
                             "hold the video frames only (make them with PhantomRolloutPipeline.prepare_latents)")
        return count

    @staticmethod
    def _check_conditioning_scale(conditioning_scale: float) -> None:
        if conditioning_scale != 1.0:
            raise ValueError(f"sample.conditioning_scale={conditioning_scale} scales VACE's control stream; Phantom "
                             "has none. Set it to 1.0 and tune sample.image_guidance_scale instead")

    # ------------------------------------------------------------------ 2. encode
    @torch.no_grad()
    def encode_references(
        self, reference_images: Sequence[Sequence[Image.Image]], height: int, width: int
    ) -> torch.Tensor:
        """``(B, z, n, h, w)`` clean, normalised reference latents in input order; all B * n
        references go through ONE VAE call, each as its own one-frame video."""
        num_references = len(reference_images[0])
        canvases = [fit_on_white_canvas(image, height, width) for refs in reference_images for image in refs]
        pixels = torch.stack(canvases)[:, :, None].to(self.device)  # (B * n, 3, 1, H, W)
        latents = self._vae_encode(pixels)  # (B * n, z, 1, h, w)
        latents = latents.view(len(reference_images), num_references, self.z_dim, *latents.shape[-2:])
        return latents.permute(0, 2, 1, 3, 4).to(self.dtype)

    def encode_conditioning(
        self, reference_images: Sequence[Sequence[Image.Image]], height: int, width: int, num_frames: int
    ) -> torch.Tensor:
        """:meth:`encode_references`; the references do not depend on ``num_frames``."""
        return self.encode_references(reference_images, height, width)

    # ------------------------------------------------------------------ 4. latents
    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        frames = (num_frames - 1) // self.scale_temporal + 1
        return (batch, self.transformer_config.in_channels, frames,
                height // self.scale_spatial, width // self.scale_spatial)

    def _latent_shape(self, batch: int, height: int, width: int, num_frames: int,
                      num_references: int) -> tuple[int, ...]:
        """``(B, C, F_lat, h, w)``: the VIDEO frames only. ``num_references`` is accepted so the
        train loop calls both pipelines alike; Phantom's reference slots are clean latents, never
        noise, so it does not change the shape."""
        return self.latent_shape(batch, height, width, num_frames)

    # ------------------------------------------------------------------ 5. denoise
    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        conditioning: torch.Tensor,
        guidance_scale: float,
        conditioning_scale: float = 1.0,
        transformer=None,
    ) -> torch.Tensor:
        """Guided velocity of the video frames, ``(B, C, F_lat, h, w)`` float32.

        Args:
            latents: ``(B, C, F_lat, h, w)`` noisy video latents.
            conditioning: ``(B, z, n, h, w)`` clean reference latents, appended after the video.
            guidance_scale: ``> 1`` runs the three branches as ONE call on a ``3B`` batch.
        """
        self._check_conditioning_scale(conditioning_scale)
        transformer = transformer if transformer is not None else self.transformer
        batch, video_frames = latents.shape[0], latents.shape[2]
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        references = conditioning.to(self.dtype)
        with_refs = torch.cat([latents.to(self.dtype), references], dim=2)
        do_guidance = negative_prompt_embeds is not None and guidance_scale > 1.0
        if do_guidance:
            negative = negative_prompt_embeds.expand(batch, -1, -1)
            # Zero latents are Phantom's "no reference" input (zero in the normalised latent space).
            without_refs = torch.cat([latents.to(self.dtype), torch.zeros_like(references)], dim=2)
            hidden = torch.cat([with_refs, with_refs, without_refs])
            text = torch.cat([prompt_embeds, negative, negative])
            timestep = torch.cat([timestep, timestep, timestep])
        else:
            hidden, text = with_refs, prompt_embeds
        noise_pred = transformer(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False,
        )[0].float()
        # The reference slots' prediction is discarded: they are re-inserted clean every step.
        noise_pred = noise_pred[:, :, :video_frames]
        if do_guidance:
            pos_it, pos_i, neg = noise_pred.chunk(3)
            noise_pred = (neg + self.image_guidance_scale * (pos_i - neg)
                          + self.text_guidance_scale * (pos_it - pos_i))
        return noise_pred

    def video_frames(self, num_references: int) -> slice:
        """Phantom's state holds video frames only (the references are appended per call)."""
        return slice(None)

    # ------------------------------------------------------------------ 6. decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final video latents ``(B, C, F_lat, h, w)`` -> ``(B, F, H, W, 3)`` uint8 frames. Only video
        frames exist in the state, so no reference frame can reach the decoded video."""
        return self._decode_video(latents)

    def _decode_rollout(self, latents: torch.Tensor, num_references: int) -> torch.Tensor:
        return self.decode(latents)


# ---------------------------------------------------------------------------------------- loading
def _scheduler_with_shift(scheduler, shift: float | None):
    """The base scheduler with its flow shift set to ``shift`` (None keeps the folder's value).
    UniPC (Wan's default) calls it ``flow_shift``, flow-match Euler ``shift``."""
    if not shift:
        return scheduler
    for name in ("flow_shift", "shift"):
        if name in scheduler.config:
            return type(scheduler).from_config(scheduler.config, **{name: float(shift)})
    raise ValueError(f"{type(scheduler).__name__} has no flow shift setting; unset sample.flow_shift")


def load_phantom_pipeline(config, device: torch.device, dtype: torch.dtype) -> PhantomRolloutPipeline:
    """The Phantom rollout pipeline for ``config.model_type == "phantom"``; all weights frozen.

    Reads ``config.pretrained.model`` (Wan2.1-T2V-1.3B diffusers folder or hub id: tokenizer,
    UMT5, VAE, scheduler, transformer config), ``config.pretrained.phantom_dit`` (the released
    ``.pth`` or a converted diffusers transformer folder), ``config.pretrained.build_tiny``,
    ``config.sample.image_guidance_scale``, ``config.sample.text_guidance_scale``,
    ``config.sample.flow_shift``. The transformer and text encoder are in ``dtype``, the VAE in
    fp32 (Wan's VAE is numerically fragile in half precision).
    """
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from identity_grpo.configuration import phantom_guidance_error
    from identity_grpo.phantom_convert import load_phantom_transformer

    # Settings are checked before anything is written or loaded.
    sample = config.sample
    error = phantom_guidance_error(sample)
    if error:
        raise ValueError(error)
    dit = config.pretrained.get("phantom_dit", "")
    if not dit:
        raise ValueError("config.pretrained.phantom_dit is empty: set it to Phantom-Wan-1.3B.pth (original format) "
                         "or to a converted diffusers transformer folder")
    base = config.pretrained.model
    if config.pretrained.get("build_tiny", False) and not Path(base, "model_index.json").is_file():
        from identity_grpo.testing import write_tiny_phantom

        logger.info("writing tiny random Phantom models to %s", base)
        write_tiny_phantom(base)
    local = Path(base).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=local)
    text_encoder = UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype,
                                                    local_files_only=local)
    vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32, local_files_only=local)
    transformer = load_phantom_transformer(dit, base, dtype=dtype, local_files_only=local)
    # Only the scheduler is still read from the folder; the other components are passed in.
    pipe = WanPipeline.from_pretrained(
        base, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        local_files_only=local,
    )
    pipe.scheduler = _scheduler_with_shift(pipe.scheduler, sample.get("flow_shift", None))
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
        module.to(device)
    return PhantomRolloutPipeline(pipe, image_guidance_scale=sample.image_guidance_scale,
                                  text_guidance_scale=sample.text_guidance_scale, dtype=dtype)
