"""Batched Wan2.1-VACE rollouts with the SDE sampler, built from ``WanVACEPipeline``'s components.

``WanVACEPipeline.__call__`` generates one video per call and keeps no record of the
transitions. A GRPO group needs B videos denoised together, every SDE step's log-density, and
the exact inputs to re-score each step later. This module does that with the pipeline's own
pieces (``encode_prompt``, ``preprocess_conditions``, ``prepare_masks``, the VAE, the
scheduler's sigma schedule); only the batched conditioning is written here, the loop and the
record are :class:`~identity_grpo.pipelines.base.RolloutPipeline`'s.

Reference order: the references of an item are placed in the conditioning IN INPUT ORDER
(``refs[0]`` first in time), as in the original VACE code. diffusers' loop prepends them one at a
time, which reverses them; to reproduce a diffusers video, pass diffusers the reversed list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

# Rollouts, SDEConfig and frames_to_uint8 are imported from here by the train and test code.
from identity_grpo.pipelines.base import RolloutPipeline, Rollouts, SDEConfig, frames_to_uint8

__all__ = ["Rollouts", "SDEConfig", "VaceRolloutPipeline", "frames_to_uint8"]


class VaceRolloutPipeline(RolloutPipeline):
    """Batched SDE/ODE sampling and re-scoring for a (LoRA-adapted) Wan VACE transformer.

    The state the sampler acts on is the full VACE latent: ``n`` reference frames, then the
    video frames, ``(B, C, n + F_lat, h, w)``.

    Args:
        pipe: a loaded ``WanVACEPipeline``; its tokenizer, text encoder, VAE and scheduler are
            used as they are. ``transformer`` may be replaced by a peft / DDP-wrapped module.
        dtype: compute dtype of the transformer inputs (the frozen weights' dtype).
    """

    def __init__(self, pipe, dtype: torch.dtype | None = None):
        super().__init__(pipe, dtype)
        self.vace_layers = len(pipe.transformer.config.vace_layers)
        self._video_condition_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._mask_cache: dict[tuple[int, int, int, int], torch.Tensor] = {}

    @property
    def transformer_config(self):
        return self.pipe.transformer.config

    # ------------------------------------------------------------------ 2. encode
    def _video_condition(self, height: int, width: int, num_frames: int) -> torch.Tensor:
        """``(1, 2z, F_lat, h, w)``: latents of the empty control video (no video input: zeros,
        mask all ones), identical for every item of a given size, so encoded once."""
        key = (height, width, num_frames)
        if key not in self._video_condition_cache:
            empty = torch.zeros(1, 3, num_frames, height, width, device=self.device)
            latents = self._vae_encode(empty)
            # inactive = video * (1 - mask) and reactive = video * mask are both the zero video.
            self._video_condition_cache[key] = torch.cat([latents, latents], dim=1)
        return self._video_condition_cache[key]

    def _mask(self, height: int, width: int, num_frames: int, num_references: int) -> torch.Tensor:
        """``(1, 64, n + F_lat, h, w)`` VACE mask: 0 on reference frames, 1 on frames to generate."""
        key = (height, width, num_frames, num_references)
        if key not in self._mask_cache:
            mask = torch.ones(1, 3, num_frames, height, width, device=self.device)
            video_mask = self.pipe.prepare_masks(mask, [[]])
            # Padded here rather than by prepare_masks, which slices the padding from the video
            # mask and so gives too few zero frames when references outnumber latent frames.
            reference_mask = torch.zeros_like(video_mask[:, :, :1]).expand(-1, -1, num_references, -1, -1)
            self._mask_cache[key] = torch.cat([reference_mask, video_mask], dim=2)
        return self._mask_cache[key]

    @torch.no_grad()
    def encode_conditioning(
        self, reference_images: Sequence[Sequence[Image.Image]], height: int, width: int, num_frames: int
    ) -> torch.Tensor:
        """``(B, 2z + 64, n + F_lat, h, w)`` control latents; all references in one VAE call.

        Each reference is fitted (aspect kept) onto a white canvas of the video size by the
        pipeline's own ``preprocess_conditions``, encoded as a one-frame video, paired with zero
        "reactive" latents and placed before the video frames in input order. Items that pass the
        very same image objects (the K members of a group, see ``loop.rollout_rows``) are encoded
        once and share the result.
        """
        num_references = len(reference_images[0])
        unique: dict[tuple[int, ...], int] = {}
        canvases = []
        for refs in reference_images:
            key = tuple(id(image) for image in refs)
            if key in unique:
                continue
            unique[key] = len(unique)
            _, _, processed = self.pipe.preprocess_conditions(
                None, None, [list(refs)], 1, height, width, 1, torch.float32, self.device
            )
            canvases.extend(processed[0])
        ref_latents = self._vae_encode(torch.stack(canvases)[:, :, None])  # (U * n, z, 1, h, w)
        ref_latents = ref_latents.view(len(unique), num_references, self.z_dim, *ref_latents.shape[-2:])
        item = torch.tensor([unique[tuple(id(image) for image in refs)] for refs in reference_images])
        ref_latents = ref_latents[item.to(ref_latents.device)].permute(0, 2, 1, 3, 4)  # (B, z, n, h, w)
        batch = len(reference_images)
        ref_part = torch.cat([ref_latents, torch.zeros_like(ref_latents)], dim=1)
        video_part = self._video_condition(height, width, num_frames).expand(batch, -1, -1, -1, -1)
        mask = self._mask(height, width, num_frames, num_references).expand(batch, -1, -1, -1, -1)
        return torch.cat([torch.cat([ref_part, video_part], dim=2), mask], dim=1).to(self.dtype)

    # ------------------------------------------------------------------ 4. latents
    def _latent_shape(self, batch: int, height: int, width: int, num_frames: int,
                      num_references: int) -> tuple[int, ...]:
        """``(B, C, n + F_lat, h, w)``: the reference slots are part of the noised state."""
        frames = (num_frames - 1) // self.scale_temporal + 1 + num_references
        return (batch, self.transformer_config.in_channels, frames,
                height // self.scale_spatial, width // self.scale_spatial)

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
        """Guided velocity ``(B, C, T, h, w)`` float32; with CFG, cond and uncond run as ONE
        transformer call on the stacked batch (half the launches of the stock pipeline)."""
        transformer = transformer if transformer is not None else self.transformer
        batch = latents.shape[0]
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        scale = torch.full((self.vace_layers,), conditioning_scale, device=latents.device, dtype=self.dtype)
        hidden = latents.to(self.dtype)
        do_cfg = negative_prompt_embeds is not None and guidance_scale > 1.0
        if do_cfg:
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
            text = torch.cat([prompt_embeds, negative_prompt_embeds.expand(batch, -1, -1)])
            control = torch.cat([conditioning, conditioning])
        else:
            text, control = prompt_embeds, conditioning
        noise_pred = transformer(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, control_hidden_states=control,
            control_hidden_states_scale=scale, return_dict=False,
        )[0].float()
        if do_cfg:
            noise_cond, noise_uncond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        return noise_pred

    def video_frames(self, num_references: int) -> slice:
        """The reference slots come first in VACE's state."""
        return slice(num_references, None)

    def text_to_video_velocity(self, latents, timestep, prompt_embeds, conditioning, num_references,
                               transformer=None) -> torch.Tensor:
        """Without a separate :attr:`teacher`: ``transformer`` (the caller disables the LoRA) on the
        video frames with the VACE context switched off, which is exactly the Wan2.1 T2V
        transformer on VACE's base weights (tests/test_evoid.py)."""
        if self.teacher is not None:
            return super().text_to_video_velocity(latents, timestep, prompt_embeds, conditioning, num_references)
        video = self.video_frames(num_references)
        return self.guided_velocity(latents[:, :, video], timestep, prompt_embeds, None, conditioning[:, :, video], 1.0,
                                    0.0, transformer=transformer)

    # ------------------------------------------------------------------ 6. decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_references: int) -> torch.Tensor:
        """Final latents (reference frames included) -> ``(B, F, H, W, 3)`` uint8 frames."""
        return self._decode_video(latents[:, :, num_references:])

    def _decode_rollout(self, latents: torch.Tensor, num_references: int) -> torch.Tensor:
        return self.decode(latents, num_references)
