"""The sampling loop shared by the rollout pipelines: batched SDE/ODE denoising with a record of
every stochastic transition, and re-scoring of a recorded step.

VACE and Phantom are both Wan2.1 DiTs with the same tokenizer, UMT5 encoder, VAE and
flow-matching scheduler; they differ only in how the references reach the transformer and which
latent frames the sampler acts on. :class:`RolloutPipeline` holds everything else (prompt
encoding, the schedule, the denoise loop, the :class:`Rollouts` record, ``rescore``) and asks the
subclass, through a few hooks, for what differs:

- :meth:`RolloutPipeline.check_inputs` / ``_check_call``: batch validation before any model call;
- :meth:`RolloutPipeline.encode_conditioning`: the reference conditioning stored in the record;
- ``_latent_shape``: the shape of the sampled state (with or without reference frames);
- :meth:`RolloutPipeline.predict_noise`: the guided velocity of the state;
- ``_decode_rollout``: final state -> uint8 frames;
- :meth:`RolloutPipeline.video_frames` and, where the model itself can act as EvoID's text-to-video
  teacher, :meth:`RolloutPipeline.text_to_video_velocity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from identity_grpo.schedules import set_timesteps
from identity_grpo.sde import sde_step


@dataclass
class SDEConfig:
    """How the stochastic steps are taken (see :func:`identity_grpo.sde.sde_step`)."""

    schedule: str = "identity_grpo"
    noise_level: float = 1.0


@dataclass
class Rollouts:
    """Everything training needs to re-score a batch of B rollouts, S recorded SDE steps each.

    Shapes are VACE's; Phantom's state and conditioning hold other frames, see
    :mod:`identity_grpo.pipelines.phantom`.

    Attributes:
        latents: ``(B, S, C, T, h, w)`` state before each recorded step (T = latent frames + number
            of references), in the storage dtype the sampler was given (float32 by default; see
            ``store_dtype`` of :meth:`RolloutPipeline.__call__`).
        next_latents: ``(B, S, C, T, h, w)`` state after it (the sampled action), same dtype.
        log_probs: ``(B, S)`` float32 log-density of each action when it was sampled.
        timesteps: ``(S,)`` transformer timesteps of the recorded steps.
        sigmas: ``(S,)`` and ``sigmas_next``: ``(S,)`` the step's start / end noise levels.
        step_indices: ``(S,)`` position of each recorded step in the full schedule.
        conditioning: ``(B, 2 z + 64, T, h, w)`` VACE control latents (refs, then video, + mask).
        prompt_embeds: ``(B, L, D)``; negative_prompt_embeds: ``(1, L, D)`` or None without CFG.
        group_ids: ``(B,)`` int64 group of each rollout.
        num_references: references per item (equal within a batch).
        sigma_max, sigma_min: the schedule's bounds used by the noise schedule.
        final_latents: ``(B, C, T, h, w)`` float32 final (clean) state, what the forward-process
            objectives train on.
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
    final_latents: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1]

    def to(self, device: torch.device | str) -> Rollouts:
        """The same record with every per-rollout tensor on ``device`` (``group_ids`` stays on the
        CPU, where the advantage code reads it). Moving to the CPU between sampling and training
        frees the accelerator memory of the record (``sample.offload_rollouts``); tensors already
        on ``device`` are not copied."""
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return Rollouts(
            latents=move(self.latents), next_latents=move(self.next_latents), log_probs=move(self.log_probs),
            timesteps=move(self.timesteps), sigmas=move(self.sigmas), sigmas_next=move(self.sigmas_next),
            step_indices=self.step_indices, conditioning=move(self.conditioning),
            prompt_embeds=move(self.prompt_embeds), negative_prompt_embeds=move(self.negative_prompt_embeds),
            group_ids=self.group_ids, num_references=self.num_references, sigma_max=self.sigma_max,
            sigma_min=self.sigma_min, final_latents=move(self.final_latents),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the record's tensors (shared tensors such as the negative prompt counted
        once per record): what a rank keeps per sampling batch between sampling and training."""
        tensors = [self.latents, self.next_latents, self.log_probs, self.timesteps, self.sigmas, self.sigmas_next,
                   self.step_indices, self.conditioning, self.prompt_embeds, self.negative_prompt_embeds,
                   self.group_ids, self.final_latents]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def select(self, index: torch.Tensor) -> Rollouts:
        """The rollouts at batch positions ``index`` (shared tensors are kept). ``index`` may live on
        any device: each tensor is indexed on its own (``group_ids`` stays on the CPU)."""
        index = torch.as_tensor(index)
        return Rollouts(
            latents=self.latents[index], next_latents=self.next_latents[index], log_probs=self.log_probs[index],
            timesteps=self.timesteps, sigmas=self.sigmas, sigmas_next=self.sigmas_next,
            step_indices=self.step_indices, conditioning=self.conditioning[index],
            prompt_embeds=self.prompt_embeds[index], negative_prompt_embeds=self.negative_prompt_embeds,
            group_ids=self.group_ids[index.to(self.group_ids.device)], num_references=self.num_references,
            sigma_max=self.sigma_max, sigma_min=self.sigma_min,
            final_latents=None if self.final_latents is None else self.final_latents[index.to(self.final_latents.device)],
        )


def frames_to_uint8(video: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """VAE output ``(B, 3, F, H, W)`` in [-1, 1] -> ``(B, F, H, W, 3)`` uint8, rounded to the
    nearest level, or with ``truncate`` rounded down as upstream converts its rollouts
    (``((video + 1) * 127.5).clamp(0, 255).to(torch.uint8)``: half a level darker on average)."""
    if truncate:
        video = ((video.float() + 1) * 127.5).clamp(0, 255)
    else:
        video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    return video.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class RolloutPipeline:
    """Batched SDE/ODE sampling and re-scoring for a (LoRA-adapted) Wan2.1 DiT.

    Args:
        pipe: a loaded diffusers Wan pipeline; its tokenizer, text encoder, VAE and scheduler are
            used as they are. ``transformer`` may be replaced by a peft / DDP-wrapped module.
        dtype: compute dtype of the transformer inputs (the frozen weights' dtype).

    Subclasses provide ``transformer_config`` and the hooks listed in the module docstring.
    """

    # Flow-GRPO-Fast's shared ODE prefix; a subclass sets False where it is not validated.
    supports_shared_prefix = True
    # "installed": the scheduler's own sigma table; "v0.35": diffusers 0.35's table for flow UniPC
    # schedulers, as upstream pins it (see identity_grpo.schedules; config.sample.sigma_table).
    sigma_table = "installed"
    # Solver of fully deterministic calls (evaluation, batch inference): "scheduler" (the
    # scheduler's own step, e.g. Wan's 2nd-order UniPC, as the released pipelines sample) or
    # "euler" (the first-order step the SDE reduces to at zero noise; upstream's evaluation).
    ode_solver = "scheduler"
    # Decoded frames to uint8 by truncation, as upstream (reward_model.mp4_roundtrip), not rounding.
    truncate_frames = False
    # EvoID's frozen text-to-video teacher (a WanTransformer3DModel), set by
    # identity_grpo.models.load_teacher; None: the subclass's own teacher, if it has one.
    teacher = None

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
        self._negative_cache: dict[tuple[str, int], torch.Tensor] = {}
        # (prompt, max_sequence_length) -> (L, D) CPU embedding, filled by cache_prompt_embeds.
        self._prompt_cache: dict[tuple[str, int], torch.Tensor] = {}
        latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32)
        latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32)
        self.latents_mean = latents_mean.view(1, -1, 1, 1, 1).to(self.device)
        self.latents_std = latents_std.view(1, -1, 1, 1, 1).to(self.device)

    # ------------------------------------------------------------------ 1. check inputs
    def check_inputs(self, prompts, reference_images, height, width, num_frames) -> int:
        """Validate a batch; returns its number of references per item."""
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

    def _check_call(self, prompts, reference_images, height, width, num_frames, conditioning_scale: float,
                    latents: torch.Tensor | None) -> int:
        """Everything ``__call__`` validates before a model call; returns the reference count.
        Subclasses extend it with checks of their own arguments."""
        return self.check_inputs(prompts, reference_images, height, width, num_frames)

    # ------------------------------------------------------------------ 2. encode
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
        """``(B, max_sequence_length, D)`` UMT5 embeddings, all prompts in one encoder call, or, after
        :meth:`cache_prompt_embeds`, from its cache (a prompt it did not encode is then an error)."""
        if self._prompt_cache:
            missing = [p for p in dict.fromkeys(prompts) if (p, max_sequence_length) not in self._prompt_cache]
            if missing:
                raise ValueError(f"prompts {missing[:3]} (max_sequence_length {max_sequence_length}) were not encoded "
                                 "by cache_prompt_embeds, and the text encoder has left the accelerator; pass every "
                                 "prompt of the run to it (train.cache_prompt_embeds)")
            return torch.stack([self._prompt_cache[(p, max_sequence_length)] for p in prompts]).to(self.device)
        return self._run_text_encoder(prompts, max_sequence_length)

    def _run_text_encoder(self, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            device=self.device,
        )
        return embeds.to(self.dtype)

    @torch.no_grad()
    def cache_prompt_embeds(self, prompts: Sequence[str], max_sequence_length: int = 512, batch_size: int = 8,
                            offload_device: torch.device | str = "cpu") -> int:
        """Encode every distinct prompt of ``prompts`` once (``batch_size`` per encoder call), keep
        the embeddings on the CPU and move the text encoder to ``offload_device``: UMT5-XXL's
        ~11 GB (bf16) leave the accelerator for the rest of the run. Include the negative prompt.
        Returns the number of prompts cached (``config.train.cache_prompt_embeds``)."""
        unique = [p for p in dict.fromkeys(prompts) if (p, max_sequence_length) not in self._prompt_cache]
        if unique and self._prompt_cache:
            raise ValueError("cache_prompt_embeds runs once, with every prompt of the run: the text encoder has "
                             "already left the accelerator")
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            embeds = self._run_text_encoder(chunk, max_sequence_length).cpu()
            self._prompt_cache.update({(p, max_sequence_length): e for p, e in zip(chunk, embeds)})
        self.pipe.text_encoder.to(offload_device)
        return len(self._prompt_cache)

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
        """``(N, 3, F, H, W)`` pixels in [-1, 1] -> ``(N, z, F_lat, h, w)`` float32 normalised
        latents; the distribution's mode, so encoding is deterministic."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return self._normalise(latents)

    def encode_conditioning(
        self, reference_images: Sequence[Sequence[Image.Image]], height: int, width: int, num_frames: int
    ) -> torch.Tensor:
        """``(B, ...)`` reference conditioning, stored as ``Rollouts.conditioning`` and passed to
        :meth:`predict_noise` unchanged."""
        raise NotImplementedError

    # ------------------------------------------------------------------ 3. timesteps
    def schedule(self, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps (N,), sigmas (N + 1,))`` from the scheduler (its state reset, ready for its
        own ``step``), copied so later ``set_timesteps`` calls elsewhere cannot change a rollout's
        record. ``sigma_table`` picks the installed diffusers' table or diffusers 0.35's."""
        set_timesteps(self.scheduler, num_inference_steps, self.sigma_table, device=self.device)
        sigmas = self.scheduler.sigmas.to(self.device, torch.float32).clone()
        timesteps = self.scheduler.timesteps.to(self.device).clone()
        if sigmas.numel() != timesteps.numel() + 1:
            raise ValueError(f"scheduler gave {timesteps.numel()} timesteps but {sigmas.numel()} sigmas")
        return timesteps, sigmas

    # ------------------------------------------------------------------ 4. latents
    def _latent_shape(self, batch: int, height: int, width: int, num_frames: int,
                      num_references: int) -> tuple[int, ...]:
        """``(B, C, T, h, w)``: the shape of the state the sampler acts on."""
        raise NotImplementedError

    def prepare_latents(self, batch: int, height: int, width: int, num_frames: int, num_references: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, C, T, h, w)`` float32 initial noise (see ``_latent_shape``), drawn on the CPU so
        runs reproduce across devices."""
        shape = self._latent_shape(batch, height, width, num_frames, num_references)
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
        """Guided velocity ``(B, C, T, h, w)`` float32 of the state ``latents``, under
        ``transformer`` (default: the pipeline's)."""
        raise NotImplementedError

    def guided_velocity(self, *args, **kwargs) -> torch.Tensor:
        """:meth:`predict_noise` under autocast to :attr:`dtype` (when that is a half type).

        Sampling, re-scoring and evaluation all call the transformer through here, so they take
        the same numeric path whatever autocast state their caller is in. Without it an fp32 LoRA
        on bf16 weights computes in fp32 while sampling and in bf16 under the training step's
        autocast: on-policy log-ratios of up to 3e-3 on the tiny model, above the 1e-3 clip range.
        """
        with self._autocast():
            return self.predict_noise(*args, **kwargs).float()

    def _autocast(self):
        """Autocast to :attr:`dtype` when that is a half type (a no-op otherwise)."""
        half = self.dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=half)

    def video_frames(self, num_references: int) -> slice:
        """Which latent frames of the sampled state are video (not reference) frames."""
        raise NotImplementedError

    def text_to_video_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                               conditioning: torch.Tensor, num_references: int, transformer=None) -> torch.Tensor:
        """EvoID's teacher: the velocity ``(B, C, F, h, w)`` float32 of a text-to-video model on the
        video frames of the state ``latents``, given the prompt alone (no references, no CFG).

        With :attr:`teacher` set, that frozen T2V transformer; a subclass may otherwise compute it
        with ``transformer`` (VACE: its base with the VACE context off). The caller disables the
        LoRA when ``transformer`` is the trained model.
        """
        if self.teacher is None:
            raise ValueError(f"{type(self).__name__} has no text-to-video teacher of its own; set "
                             "config.pretrained.teacher to a Wan2.1-T2V diffusers folder")
        video = latents[:, :, self.video_frames(num_references)]
        timestep = timestep.expand(video.shape[0]) if timestep.ndim == 0 else timestep
        with self._autocast():
            return self.teacher(hidden_states=video.to(self.dtype), timestep=timestep,
                                encoder_hidden_states=prompt_embeds, return_dict=False)[0].float()

    # ------------------------------------------------------------------ 6. decode
    @torch.no_grad()
    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised video latents ``(B, z, F_lat, h, w)`` -> ``(B, F, H, W, 3)`` uint8 frames."""
        latents = latents.float() * self.latents_std + self.latents_mean
        video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return frames_to_uint8(video, truncate=self.truncate_frames)

    def _decode_rollout(self, latents: torch.Tensor, num_references: int) -> torch.Tensor:
        """The final state of ``__call__`` -> ``(B, F, H, W, 3)`` uint8 frames."""
        raise NotImplementedError

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
        record_steps: Sequence[int] | None = None,
        sde: SDEConfig | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        shared_prefix: bool = False,
        store_dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> tuple[Rollouts, torch.Tensor]:
        """Denoise a batch; return the transition record and the decoded ``(B, F, H, W, 3)`` uint8 frames.

        ``sde_steps`` lists the step indices taken with the SDE; all other steps are deterministic.
        ``None`` means every step; ``[]`` gives the deterministic sampler (evaluation), which
        uses :attr:`ode_solver`: by default the scheduler's own ``step``, so the video equals the
        stock pipeline's. Deterministic steps inside a stochastic rollout (window and fast modes)
        are always Euler steps: the SDE is built around the Euler step (it is its zero-noise
        limit), and a multistep solver's history would straddle the stochastic jumps.
        ``record_steps`` (a subset of ``sde_steps``, default all of them) are the steps whose
        transition and log-prob are recorded for training; upstream samples all 25 steps with the
        SDE and records the first 24. ``latents``, if given, are the initial state shaped
        as :meth:`prepare_latents` makes it. ``generator`` drives the initial noise (unless
        ``latents`` is given) and the SDE noise, on the CPU so runs reproduce across devices.

        ``shared_prefix`` (Flow-GRPO-Fast): members of a group start from the same latents, so
        their ODE steps before the first SDE step are identical; they are computed once per
        group in this batch and copied, saving ``(K_local - 1) / K_local`` of those calls.

        ``store_dtype`` (``sample.store_dtype``): dtype of the recorded ``latents`` /
        ``next_latents``. Below float32 the recorded steps act on the rounded values: the state is
        rounded before the step's transformer call and the sampled action is rounded before its
        log-prob is taken (as Flow-Factory does), so re-scoring the stored tensors with the
        unchanged policy gives exactly the recorded log-prob (a ratio of exactly 1), not one off
        by the rounding.
        """
        from tqdm.auto import tqdm

        # 1. check inputs
        if shared_prefix and not self.supports_shared_prefix:
            raise ValueError(f"shared_prefix (sample.fast_branch) is not supported by {type(self).__name__}; "
                             "set sample.fast_branch = False")
        num_references = self._check_call(prompts, reference_images, height, width, num_frames, conditioning_scale,
                                          latents)
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
        record_steps = sorted(set(sde_steps if record_steps is None else record_steps))
        if not set(record_steps) <= set(sde_steps):
            raise ValueError(f"record_steps {record_steps} must be SDE steps (sde_steps {sde_steps})")
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
        solver_steps = not sde_steps and self.ode_solver == "scheduler"
        record_latents, record_next, record_log_probs = [], [], []
        for index in tqdm(range(first_step, num_inference_steps), disable=not progress, desc="denoise", leave=False):
            rounded = index in record_steps and store_dtype != torch.float32
            if rounded:
                latents = latents.to(store_dtype).float()
            noise_pred = self.guided_velocity(latents, timesteps[index], prompt_embeds, negative, conditioning,
                                            guidance_scale, conditioning_scale)
            if solver_steps:
                latents = self.scheduler.step(noise_pred, timesteps[index], latents, return_dict=False)[0].float()
                continue
            stochastic = index in sde_steps
            noise = None
            if stochastic:
                noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(self.device)
            out = sde_step(
                noise_pred, latents, sigmas[index], sigmas[index + 1], schedule=sde.schedule,
                noise_level=sde.noise_level, sigma_max=sigma_max, sigma_min=sigma_min, noise=noise,
                deterministic=not stochastic,
            )
            if rounded:  # the log-prob of the action as it will be stored (the same call as rescore's)
                out = sde_step(
                    noise_pred, latents, sigmas[index], sigmas[index + 1], schedule=sde.schedule,
                    noise_level=sde.noise_level, sigma_max=sigma_max, sigma_min=sigma_min,
                    prev_sample=out.prev_sample.to(store_dtype),
                )
            if index in record_steps:
                if out.log_prob is None:
                    raise ValueError(f"SDE step {index} has zero noise, so it cannot be trained; leave it out of "
                                     "the trained steps (its std is 0 whatever sample.noise_level is, e.g. the "
                                     "final step of a 1-step schedule or of CPS)")
                record_latents.append(latents.to(store_dtype))
                record_next.append(out.prev_sample.to(store_dtype))
                record_log_probs.append(out.log_prob)
            latents = out.prev_sample
        # 6. decode
        frames = self._decode_rollout(latents, num_references)

        def stack(items, dim=1):
            return torch.stack(items, dim=dim) if items else torch.empty(batch, 0, device=self.device)

        steps = torch.tensor(record_steps, dtype=torch.long)
        rollouts = Rollouts(
            latents=stack(record_latents), next_latents=stack(record_next), log_probs=stack(record_log_probs),
            timesteps=timesteps[steps.to(timesteps.device)] if len(record_steps) else timesteps[:0],
            sigmas=sigmas[steps.to(sigmas.device)] if len(record_steps) else sigmas[:0],
            sigmas_next=sigmas[(steps + 1).to(sigmas.device)] if len(record_steps) else sigmas[:0],
            step_indices=steps, conditioning=conditioning, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            group_ids=torch.as_tensor(list(group_ids) if group_ids is not None else range(batch), dtype=torch.long),
            num_references=num_references, sigma_max=sigma_max, sigma_min=sigma_min, final_latents=latents,
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
            noise_pred = self.guided_velocity(prefix, timesteps[index], prompt_embeds[first], negative,
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
        noise_pred = self.guided_velocity(
            latents, rollouts.timesteps[step], rollouts.prompt_embeds, rollouts.negative_prompt_embeds,
            rollouts.conditioning, guidance_scale, conditioning_scale, transformer=transformer,
        )
        return sde_step(
            noise_pred, latents, rollouts.sigmas[step], rollouts.sigmas_next[step], schedule=sde.schedule,
            noise_level=sde.noise_level, sigma_max=rollouts.sigma_max, sigma_min=rollouts.sigma_min,
            prev_sample=rollouts.next_latents[:, step],
        )
