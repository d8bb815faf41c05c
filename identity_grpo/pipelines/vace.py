"""Batched Wan2.1-VACE rollouts with the SDE sampler, built from ``WanVACEPipeline``'s components.

``WanVACEPipeline.__call__`` generates one video per call and keeps no record of the
transitions. A GRPO group needs B videos denoised together, every SDE step's log-density, and
the exact inputs to re-score each step later. This module does that with the pipeline's own
pieces (``encode_prompt``, ``preprocess_conditions``, ``prepare_masks``, the VAE, the
scheduler's sigma schedule); only the batched conditioning and the loop are written here.

Reference order: the references of an item are placed in the conditioning IN INPUT ORDER
(``refs[0]`` first in time), as in the original VACE code. diffusers' loop prepends them one at a
time, which reverses them; to reproduce a diffusers video, pass diffusers the reversed list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from identity_grpo.sde import sde_step


@dataclass
class SDEConfig:
    """How the stochastic steps are taken (see :func:`identity_grpo.sde.sde_step`)."""

    schedule: str = "identity_grpo"
    noise_level: float = 1.0


@dataclass
class Rollouts:
    """Everything training needs to re-score a batch of B rollouts, S recorded SDE steps each.

    Attributes:
        latents: ``(B, S, C, T, h, w)`` float32 state before each recorded step
            (T = latent frames + number of references).
        next_latents: ``(B, S, C, T, h, w)`` float32 state after it (the sampled action).
        log_probs: ``(B, S)`` float32 log-density of each action when it was sampled.
        timesteps: ``(S,)`` transformer timesteps of the recorded steps.
        sigmas: ``(S,)`` and ``sigmas_next``: ``(S,)`` the step's start / end noise levels.
        step_indices: ``(S,)`` position of each recorded step in the full schedule.
        conditioning: ``(B, 2 z + 64, T, h, w)`` VACE control latents (refs, then video, + mask).
        prompt_embeds: ``(B, L, D)``; negative_prompt_embeds: ``(1, L, D)`` or None without CFG.
        group_ids: ``(B,)`` int64 group of each rollout.
        num_references: references per item (equal within a batch).
        sigma_max, sigma_min: the schedule's bounds used by the noise schedule.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    step_indices: torch.Tensor
    conditioning: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    group_ids: torch.Tensor
    num_references: int
    sigma_max: float
    sigma_min: float

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1]

    def select(self, index: torch.Tensor) -> Rollouts:
        """The rollouts at batch positions ``index`` (shared tensors are kept)."""
        return Rollouts(
            latents=self.latents[index], next_latents=self.next_latents[index], log_probs=self.log_probs[index],
            timesteps=self.timesteps, sigmas=self.sigmas, sigmas_next=self.sigmas_next,
            step_indices=self.step_indices, conditioning=self.conditioning[index],
            prompt_embeds=self.prompt_embeds[index], negative_prompt_embeds=self.negative_prompt_embeds,
            group_ids=self.group_ids[index], num_references=self.num_references,
            sigma_max=self.sigma_max, sigma_min=self.sigma_min,
        )


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """VAE output ``(B, 3, F, H, W)`` in [-1, 1] -> ``(B, F, H, W, 3)`` uint8, rounded."""
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class VaceRolloutPipeline:
    """Batched SDE/ODE sampling and re-scoring for a (LoRA-adapted) Wan VACE transformer.

    Args:
        pipe: a loaded ``WanVACEPipeline``; its tokenizer, text encoder, VAE and scheduler are
            used as they are. ``transformer`` may be replaced by a peft / DDP-wrapped module.
        dtype: compute dtype of the transformer inputs (the frozen weights' dtype).
    """

    def __init__(self, pipe, dtype: torch.dtype | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.dtype = dtype or next(pipe.transformer.parameters()).dtype
        self.device = next(pipe.transformer.parameters()).device
        self.z_dim = self.vae.config.z_dim
        self.scale_spatial = pipe.vae_scale_factor_spatial
        self.scale_temporal = pipe.vae_scale_factor_temporal
        self.vace_layers = len(pipe.transformer.config.vace_layers)
        self._negative_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._video_condition_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._mask_cache: dict[tuple[int, int, int, int], torch.Tensor] = {}
        latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32)
        latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32)
        self.latents_mean = latents_mean.view(1, -1, 1, 1, 1).to(self.device)
        self.latents_std = latents_std.view(1, -1, 1, 1, 1).to(self.device)

    # ------------------------------------------------------------------ 1. check inputs
    def check_inputs(self, prompts, reference_images, height, width, num_frames):
        if len(prompts) != len(reference_images):
            raise ValueError(f"{len(prompts)} prompts but {len(reference_images)} reference lists")
        counts = {len(refs) for refs in reference_images}
        if len(counts) != 1:
            raise ValueError(
                f"one batch must have one reference count, got {sorted(counts)}; the KRepeatSampler buckets by count"
            )
        (count,) = counts
        if not 1 <= count <= 4:
            raise ValueError(f"1-4 reference images per item are supported, got {count}")
        base = self.scale_spatial * self.transformer_config.patch_size[1]
        if height % base or width % base:
            raise ValueError(f"height and width must be divisible by {base}, got {height}x{width}")
        if num_frames % self.scale_temporal != 1:
            raise ValueError(f"num_frames must be {self.scale_temporal}k + 1, got {num_frames}")
        return count

    @property
    def transformer_config(self):
        return self.pipe.transformer.config

    # ------------------------------------------------------------------ 2. encode
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
        """``(B, max_sequence_length, D)`` UMT5 embeddings, all prompts in one encoder call."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            device=self.device,
        )
        return embeds.to(self.dtype)

    def negative_embeds(self, negative_prompt: str, max_sequence_length: int = 512) -> torch.Tensor:
        """``(1, L, D)`` embedding of the negative prompt, encoded once per run."""
        key = (negative_prompt, max_sequence_length)
        if key not in self._negative_cache:
            self._negative_cache[key] = self.encode_prompts([negative_prompt], max_sequence_length)
        return self._negative_cache[key]

    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return self._normalise(latents)

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
        "reactive" latents and placed before the video frames in input order.
        """
        num_references = len(reference_images[0])
        canvases = []
        for refs in reference_images:
            _, _, processed = self.pipe.preprocess_conditions(
                None, None, [list(refs)], 1, height, width, 1, torch.float32, self.device
            )
            canvases.extend(processed[0])
        ref_latents = self._vae_encode(torch.stack(canvases)[:, :, None])  # (B * n, z, 1, h, w)
        batch = len(reference_images)
        ref_latents = ref_latents.view(batch, num_references, self.z_dim, *ref_latents.shape[-2:])
        ref_latents = ref_latents.permute(0, 2, 1, 3, 4)  # (B, z, n, h, w), input order
        ref_part = torch.cat([ref_latents, torch.zeros_like(ref_latents)], dim=1)
        video_part = self._video_condition(height, width, num_frames).expand(batch, -1, -1, -1, -1)
        mask = self._mask(height, width, num_frames, num_references).expand(batch, -1, -1, -1, -1)
        return torch.cat([torch.cat([ref_part, video_part], dim=2), mask], dim=1).to(self.dtype)

    # ------------------------------------------------------------------ 3. timesteps
    def schedule(self, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps (N,), sigmas (N + 1,))`` from the scheduler, copied so later
        ``set_timesteps`` calls elsewhere cannot change a rollout's record."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sigmas = self.scheduler.sigmas.to(self.device, torch.float32).clone()
        timesteps = self.scheduler.timesteps.to(self.device).clone()
        if sigmas.numel() != timesteps.numel() + 1:
            raise ValueError(f"scheduler gave {timesteps.numel()} timesteps but {sigmas.numel()} sigmas")
        return timesteps, sigmas

    # ------------------------------------------------------------------ 4. latents
    def prepare_latents(self, batch: int, height: int, width: int, num_frames: int, num_references: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        frames = (num_frames - 1) // self.scale_temporal + 1 + num_references
        shape = (batch, self.transformer_config.in_channels, frames,
                 height // self.scale_spatial, width // self.scale_spatial)
        return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device)

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

    # ------------------------------------------------------------------ 6. decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_references: int) -> torch.Tensor:
        """Final latents (reference frames included) -> ``(B, F, H, W, 3)`` uint8 frames."""
        latents = latents[:, :, num_references:].float() * self.latents_std + self.latents_mean
        video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return frames_to_uint8(video)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        reference_images: Sequence[Sequence[Image.Image]],
        *,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str = "",
        max_sequence_length: int = 512,
        conditioning_scale: float = 1.0,
        group_ids: Sequence[int] | None = None,
        sde_steps: Sequence[int] | None = None,
        sde: SDEConfig | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        shared_prefix: bool = False,
        progress: bool = False,
    ) -> tuple[Rollouts, torch.Tensor]:
        """Denoise a batch; return the transition record and the decoded uint8 frames.

        ``sde_steps`` lists the step indices taken with the SDE (their log-probs are recorded);
        all other steps are Euler ODE steps. ``None`` means every step; ``[]`` gives the
        deterministic sampler (evaluation). ``generator`` drives the initial noise (unless
        ``latents`` is given) and the SDE noise, on the CPU so runs reproduce across devices.

        ``shared_prefix`` (Flow-GRPO-Fast): members of a group start from the same latents, so
        their ODE steps before the first SDE step are identical; they are computed once per
        group in this batch and copied, saving ``(K_local - 1) / K_local`` of those calls.
        """
        from tqdm.auto import tqdm

        # 1. check inputs
        num_references = self.check_inputs(prompts, reference_images, height, width, num_frames)
        batch = len(prompts)
        sde = sde or SDEConfig()
        # 2. encode prompts and references
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompts(prompts, max_sequence_length)
        negative = self.negative_embeds(negative_prompt, max_sequence_length) if guidance_scale > 1.0 else None
        conditioning = self.encode_conditioning(reference_images, height, width, num_frames)
        # 3. timesteps
        timesteps, sigmas = self.schedule(num_inference_steps)
        sde_steps = sorted(set(range(num_inference_steps) if sde_steps is None else sde_steps))
        sigma_max, sigma_min = float(sigmas[1]), float(sigmas[-1])
        # 4. latents
        if latents is None:
            latents = self.prepare_latents(batch, height, width, num_frames, num_references, generator)
        latents = latents.float().to(self.device)
        first_step = 0
        if shared_prefix:
            first_step = sde_steps[0] if sde_steps else num_inference_steps
            latents = self._shared_ode_prefix(latents, group_ids, first_step, timesteps, sigmas, prompt_embeds,
                                              negative, conditioning, guidance_scale, conditioning_scale)
        # 5. denoise
        record_latents, record_next, record_log_probs = [], [], []
        for index in tqdm(range(first_step, num_inference_steps), disable=not progress, desc="denoise", leave=False):
            noise_pred = self.predict_noise(latents, timesteps[index], prompt_embeds, negative, conditioning,
                                            guidance_scale, conditioning_scale)
            stochastic = index in sde_steps
            noise = None
            if stochastic:
                noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(self.device)
            out = sde_step(
                noise_pred, latents, sigmas[index], sigmas[index + 1], schedule=sde.schedule,
                noise_level=sde.noise_level, sigma_max=sigma_max, sigma_min=sigma_min, noise=noise,
                deterministic=not stochastic,
            )
            if stochastic:
                if out.log_prob is None:
                    raise ValueError(f"SDE step {index} has zero noise; raise sample.noise_level or drop the step")
                record_latents.append(latents)
                record_next.append(out.prev_sample)
                record_log_probs.append(out.log_prob)
            latents = out.prev_sample
        # 6. decode
        frames = self.decode(latents, num_references)

        def stack(items, dim=1):
            return torch.stack(items, dim=dim) if items else torch.empty(batch, 0, device=self.device)

        steps = torch.tensor(sde_steps, dtype=torch.long)
        rollouts = Rollouts(
            latents=stack(record_latents), next_latents=stack(record_next), log_probs=stack(record_log_probs),
            timesteps=timesteps[steps.to(timesteps.device)] if len(sde_steps) else timesteps[:0],
            sigmas=sigmas[steps.to(sigmas.device)] if len(sde_steps) else sigmas[:0],
            sigmas_next=sigmas[(steps + 1).to(sigmas.device)] if len(sde_steps) else sigmas[:0],
            step_indices=steps, conditioning=conditioning, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            group_ids=torch.as_tensor(list(group_ids) if group_ids is not None else range(batch), dtype=torch.long),
            num_references=num_references, sigma_max=sigma_max, sigma_min=sigma_min,
        )
        return rollouts, frames

    def _shared_ode_prefix(self, latents, group_ids, num_steps, timesteps, sigmas, prompt_embeds, negative,
                           conditioning, guidance_scale, conditioning_scale) -> torch.Tensor:
        """Run ODE steps ``[0, num_steps)`` once per group and expand back to the batch."""
        if group_ids is None:
            raise ValueError("shared_prefix needs group_ids")
        ids = torch.as_tensor(list(group_ids))
        unique, inverse = torch.unique(ids, return_inverse=True)
        first = torch.zeros(len(unique), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(ids)), "amin", include_self=False)
        inverse, first = inverse.to(self.device), first.to(self.device)
        if not torch.equal(latents, latents[first][inverse]):
            raise ValueError("shared_prefix needs identical initial latents within each group (sample.same_latent)")
        prefix = latents[first]
        for index in range(num_steps):
            noise_pred = self.predict_noise(prefix, timesteps[index], prompt_embeds[first], negative,
                                            conditioning[first], guidance_scale, conditioning_scale)
            prefix = sde_step(noise_pred, prefix, sigmas[index], sigmas[index + 1], deterministic=True).prev_sample
        return prefix[inverse]

    def rescore(
        self,
        rollouts: Rollouts,
        step: int,
        *,
        guidance_scale: float,
        sde: SDEConfig,
        conditioning_scale: float = 1.0,
        transformer=None,
    ):
        """Re-evaluate recorded step ``step`` (position in ``rollouts``) under ``transformer``:
        returns the :class:`~identity_grpo.sde.SDEStepOutput` with the stored action as
        ``prev_sample``, so ``log_prob`` carries gradients through the transformer."""
        latents = rollouts.latents[:, step]
        noise_pred = self.predict_noise(
            latents, rollouts.timesteps[step], rollouts.prompt_embeds, rollouts.negative_prompt_embeds,
            rollouts.conditioning, guidance_scale, conditioning_scale, transformer=transformer,
        )
        return sde_step(
            noise_pred, latents, rollouts.sigmas[step], rollouts.sigmas_next[step], schedule=sde.schedule,
            noise_level=sde.noise_level, sigma_max=rollouts.sigma_max, sigma_min=rollouts.sigma_min,
            prev_sample=rollouts.next_latents[:, step],
        )
