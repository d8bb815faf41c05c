"""Online RL post-training of Wan2.1-VACE / Phantom for identity preservation (Identity-GRPO).

    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
        train_wan2_1_vace.py --config config/dgx.py:vace [--config.train.beta=0.01 ...]

(``fsdp2.yaml`` instead shards the transformer with FSDP2, e.g. for ``config/dgx.py:vace14b``.)

Each epoch: sample K videos per drawn (prompt, references) item -> score them ->
group-normalised advantages -> update the LoRA weights. ``config.algorithm`` picks the sampler
and the update: "grpo" (SDE rollouts, clipped ratio on the recorded steps), "nft"
(DiffusionNFT: the old-policy adapter samples deterministically, the clean latents are
re-noised and trained with the positive/negative velocity loss) or "evoid" (nft plus EvoID's
teacher and self anchors); everything else is shared.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from absl import app, flags
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from ml_collections import config_flags
from tqdm.auto import tqdm

from identity_grpo.advantages import update_mask, zero_std_mask
from identity_grpo.checkpoint import (
    full_tensor,
    load_checkpoint,
    reporting_write_errors,
    resolve_checkpoint,
    save_checkpoint,
    save_lora,
    set_aside_later_checkpoints,
)
from identity_grpo.configuration import num_train_steps, validate_config
from identity_grpo.context_parallel import data_ranks, enable_context_parallel
from identity_grpo.data import ReferenceVideoDataset
from identity_grpo.ema import ema_repeats, ema_update
from identity_grpo.evoid import anchor_losses
from identity_grpo.grpo import grpo_loss
from identity_grpo.nft import draw_timesteps, nft_loss, old_policy_decay, optimality_probability
from identity_grpo.old_policy import OLD, active_adapter, add_old_policy, old_policy_state, update_old_policy
from identity_grpo.loop import (
    evaluate,
    log_eval_videos,
    log_rollout_videos,
    make_unique_dir,
    mean_stats,
    reward_models_on,
    rollout_rows,
    run_prompts,
    sde_config,
    seeded_generator,
)
from identity_grpo.models import DTYPES, add_lora, fsdp2_mesh, fsdp2_plugin, load_rollout_pipeline, shard_transformer
from identity_grpo.pipelines.vace import Rollouts
from identity_grpo.report import before_after_png, write_report
from identity_grpo.rewards import RewardInputs, build_reward_fn
from identity_grpo.rewards.composite import epoch_advantages
from identity_grpo.sampling import KRepeatSampler
from identity_grpo.sde import gaussian_kl
from identity_grpo.tracking import append_jsonl, flat_config, init_logging, write_json

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "config/dgx.py:vace", "Training configuration (a preset of config/dgx.py).")
logger = get_logger(__name__)


@dataclass
class SampledBatch:
    """One sampling batch of B rollouts on this rank, with its rewards and advantages."""

    rollouts: Rollouts
    inputs: RewardInputs  # the decoded frames, references and prompts that were scored
    rewards: dict[str, torch.Tensor]  # key -> (B,)
    reward_seconds: dict[str, float]  # reward name -> wall time of its call
    advantages: torch.Tensor | None = None  # (B,)
    constant_group: torch.Tensor | None = None  # (B,) bool: the sample's group has equal rewards


def sample_epoch(epoch, config, accelerator, pipeline, dataset, sampler, reward_fn, executor) -> list[SampledBatch]:
    """Roll out ``num_batches_per_epoch`` batches; each batch's rewards are computed in a worker
    thread while the next batch is being denoised."""
    pending = []
    for batch_index in tqdm(range(config.sample.num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                            disable=not accelerator.is_local_main_process):
        step = epoch * config.sample.num_batches_per_epoch + batch_index
        drawn = sampler.batch(step)
        # Seeded by data replica: the ranks of a context-parallel group draw the same noise.
        generator = seeded_generator(config.seed, "train", step, data_ranks(accelerator, config).rank)
        latents = None
        if config.sample.same_latent or config.sample.fast_branch:
            # One initial noise per group (the group id is global, so ranks agree).
            count = len(dataset[drawn.indices[0]].reference_paths)
            latents = torch.cat([
                pipeline.prepare_latents(1, config.height, config.width, config.frames, count,
                                         seeded_generator(config.seed, "group", group_id))
                for group_id in drawn.group_ids
            ])
        rollouts, inputs = rollout_rows(pipeline, dataset, drawn.indices, config, generator=generator,
                                        group_ids=drawn.group_ids, latents=latents, step=step)
        if config.sample.offload_rollouts:  # update_inputs brings each batch back while training
            rollouts = rollouts.to("cpu")
        pending.append((rollouts, inputs, executor.submit(reward_fn, inputs)))
    batches = []
    for rollouts, inputs, future in pending:
        scores, seconds = future.result()
        batches.append(SampledBatch(rollouts, inputs, scores, seconds))
    return batches


def assign_advantages(batches: list[SampledBatch], config, accelerator) -> dict[str, float]:
    """Gather every rank's rewards and group ids, normalise within groups (combining rewards as
    ``config.reward_combination`` says), keep this rank's share. Returns reward metrics."""
    ranks = data_ranks(accelerator, config)

    def gather(local: torch.Tensor) -> torch.Tensor:  # each data replica's samples once
        return ranks.own_share(accelerator.gather(local.to(accelerator.device)).cpu(), accelerator.num_processes)

    group_ids = gather(torch.cat([b.rollouts.group_ids for b in batches]))
    rewards = {key: gather(torch.cat([b.rewards[key] for b in batches])) for key in batches[0].rewards}
    result = epoch_advantages(rewards, group_ids, config, global_std=config.sample.global_std,
                              clip_max=config.train.adv_clip_max)
    advantages = result.advantages * config.train.advantage_sign
    mine = ranks.mine(advantages)
    constant = ranks.mine(zero_std_mask(rewards["total"], group_ids))
    sizes = [b.rollouts.batch_size for b in batches]
    for batch, chunk, is_constant in zip(batches, mine.split(sizes), constant.split(sizes)):
        batch.advantages = chunk.to(accelerator.device)
        batch.constant_group = is_constant
    metrics = {f"reward/{key}": float(value.mean()) for key, value in rewards.items()}
    metrics.update({f"reward/{name}/seconds": sum(b.reward_seconds[name] for b in batches)
                    for name in batches[0].reward_seconds})
    # The spread of the rollouts' rewards: the band around the mean in the report's reward curves.
    metrics.update({f"reward/{key}/std": float(value.float().std(correction=0)) for key, value in rewards.items()})
    metrics.update(result.metrics)
    # 1.0: no sample has anything to learn this epoch (train() warns and records it in the summary).
    metrics["reward/zero_advantage_fraction"] = float((advantages == 0).float().mean())
    metrics.update({"reward/zero_std_groups": result.stats.num_zero_std_groups,
                    "reward/num_groups": result.stats.num_groups,
                    "reward/mean_group_size": result.stats.mean_group_size})
    return metrics


def step_loss(config, accelerator, pipeline, transformer, rollouts, advantages, step: int):
    """``(loss, stats)`` of recorded step ``step``: the rollouts re-scored under the policy (with
    gradients) and, when ``train.beta > 0``, under the frozen base (adapter disabled) for the KL."""
    guidance = config.sample.guidance_scale if config.train.cfg else 1.0
    sde = sde_config(config)
    out = pipeline.rescore(rollouts, step, guidance_scale=guidance, sde=sde,
                           conditioning_scale=config.sample.conditioning_scale, transformer=transformer)
    kl = None
    if config.train.beta > 0:
        with torch.no_grad(), accelerator.unwrap_model(transformer).disable_adapter():
            reference = pipeline.rescore(rollouts, step, guidance_scale=guidance, sde=sde,
                                         conditioning_scale=config.sample.conditioning_scale,
                                         transformer=accelerator.unwrap_model(transformer))
        kl = gaussian_kl(out.prev_sample_mean, reference.prev_sample_mean, out.std)
    return grpo_loss(out.log_prob, rollouts.log_probs[:, step], advantages,
                     clip_range=config.train.clip_range, kl=kl, beta=config.train.beta)


def nft_step_loss(config, accelerator, pipeline, transformer, rollouts, advantages, timestep, noise):
    """``(loss, stats)`` of DiffusionNFT for the batch's clean latents re-noised at ``timestep``
    ``(B,)`` with ``noise``: velocities of the old adapter (no grad), the trained one and, when
    ``train.beta > 0``, the frozen base (adapter disabled). Conditional velocities only (no CFG),
    as DiffusionNFT trains."""
    x0 = rollouts.final_latents
    timestep = timestep.to(x0.device)
    t = timestep.float() / pipeline.scheduler.config.num_train_timesteps
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x_t = (1 - t.view(shape)) * x0 + t.view(shape) * noise.to(x0.device)
    peft_model = accelerator.unwrap_model(transformer)

    def velocity(model):
        return pipeline.guided_velocity(x_t, timestep, rollouts.prompt_embeds, None, rollouts.conditioning, 1.0,
                                        config.sample.conditioning_scale, transformer=model)

    with torch.no_grad(), active_adapter(peft_model, OLD):
        v_old = velocity(peft_model)
    v_theta = velocity(transformer)
    v_ref = None
    if config.train.beta > 0 or config.algorithm == "evoid":
        with torch.no_grad(), peft_model.disable_adapter():
            v_ref = velocity(peft_model)
    loss, stats = nft_loss(v_theta, v_old, x_t, x0, t, optimality_probability(advantages, config.train.adv_clip_max),
                           nft_beta=config.nft.beta, adv_clip_max=config.train.adv_clip_max, v_ref=v_ref,
                           kl_weight=config.train.beta)
    if config.algorithm == "evoid":
        with torch.no_grad(), peft_model.disable_adapter():
            v_t2v = pipeline.text_to_video_velocity(x_t, timestep, rollouts.prompt_embeds, rollouts.conditioning,
                                                    rollouts.num_references, transformer=peft_model)
        anchors, anchor_stats = anchor_losses(v_theta, v_t2v, v_ref,
                                              video_frames=pipeline.video_frames(rollouts.num_references),
                                              lambda_t2v=config.evoid.lambda_t2v, lambda_self=config.evoid.lambda_self)
        loss, stats = loss + anchors, {**stats, **anchor_stats}
    return loss, stats


def update_inputs(config, pipeline, batch, generator, sampler_timesteps=None):
    """What one sampling batch trains on: ``(rollouts, advantages, loss_scale, unit_args)``, where
    ``unit_args(unit)`` gives the loss arguments that differ between its backward passes (GRPO:
    the recorded step; NFT: a timestep per sample and fresh noise, drawn from ``generator``; with
    ``nft.timestep_sampling == "sampler"`` the timesteps come from ``sampler_timesteps``)."""
    # On the accelerator (a no-op unless sample.offload_rollouts left the record on the CPU).
    rollouts, advantages, loss_scale = batch.rollouts.to(pipeline.device), batch.advantages, 1.0
    if config.algorithm == "grpo":
        keep = update_mask(batch.advantages, batch.constant_group, config.train.filter_zero_advantage)
        if not bool(keep.all()):
            keep = keep.nonzero().flatten()
            if len(keep):
                rollouts, advantages = rollouts.select(keep.to(rollouts.latents.device)), advantages[keep]
            else:  # nothing to learn here, but every rank must make the same backward calls
                loss_scale = 0.0
        return rollouts, advantages, loss_scale, lambda unit: (unit,)
    timesteps = draw_timesteps(config.nft.timestep_sampling, num_train_steps(config), rollouts.batch_size,
                               sampler_timesteps=sampler_timesteps,
                               num_train_timesteps=pipeline.scheduler.config.num_train_timesteps, generator=generator)
    return rollouts, advantages, loss_scale, lambda unit: (
        timesteps[unit], torch.randn(rollouts.final_latents.shape, generator=generator))


def train_epoch(epoch, global_step, config, accelerator, pipeline, transformer, optimizer, ema, batches) -> int:
    """One pass (per inner epoch) over the sampled batches. GRPO: every recorded SDE step of every
    rollout is re-scored under the current LoRA; NFT: every clean sample is re-noised at
    ``num_train_steps`` timesteps. Each is one backward pass."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    ranks = data_ranks(accelerator, config)
    generator = seeded_generator(config.seed, "shuffle", epoch, ranks.rank)
    loss_fn = step_loss if config.algorithm == "grpo" else nft_step_loss
    # The sampling schedule's timesteps, once per epoch (NFT's default timestep draws).
    sampler_timesteps = (pipeline.schedule(config.sample.num_steps)[0]
                         if config.algorithm != "grpo" and config.nft.timestep_sampling == "sampler" else None)
    stats = []
    for inner in range(config.train.num_inner_epochs):
        order = torch.randperm(len(batches), generator=generator).tolist()
        bar = tqdm(order, desc=f"epoch {epoch}.{inner}: training", disable=not accelerator.is_local_main_process)
        for batch_index in bar:
            rollouts, advantages, loss_scale, unit_args = update_inputs(config, pipeline, batches[batch_index], generator,
                                                                        sampler_timesteps)
            for unit in range(num_train_steps(config)):
                with accelerator.accumulate(transformer), accelerator.autocast():
                    loss, step_stats = loss_fn(config, accelerator, pipeline, transformer, rollouts, advantages,
                                               *unit_args(unit))
                    # A context-parallel rank's gradient is its tokens' share; DDP averages the
                    # shares, so scaling by the degree gives their sum, the whole gradient.
                    accelerator.backward(loss * (loss_scale * ranks.degree))
                    if accelerator.sync_gradients:
                        step_stats["grad_norm"] = full_tensor(torch.as_tensor(
                            accelerator.clip_grad_norm_(trainable, config.train.max_grad_norm))).detach()
                    optimizer.step()
                    optimizer.zero_grad()
                stats.append(step_stats)
                if accelerator.sync_gradients:
                    if ema is not None:
                        ema_update(ema, trainable, global_step + 1, interval=config.train.ema_update_interval,
                                   repeats=ema_repeats(config.train))
                    metrics = {f"train/{k}": v for k, v in mean_stats(stats, accelerator).items()}
                    metrics["epoch"] = epoch
                    accelerator.log(metrics, step=global_step)
                    bar.set_postfix(loss=f"{metrics['train/policy_loss']:.4f}")
                    global_step += 1
                    stats = []
    return global_step


def replica_checksums(parameters, accelerator) -> list[float]:
    """Every rank's sum of its trainable weights, whole (FSDP2 gathers each rank's shard group);
    DDP replicas and hybrid-sharded groups keep them equal, so unequal sums mean a broken run
    (e.g. a rank skipped a backward call) and raise."""
    local = torch.stack([full_tensor(p.detach()).double().sum() for p in parameters]).sum().reshape(1)
    sums = accelerator.gather(local.to(accelerator.device)).tolist()
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"LoRA weights differ between ranks (checksums {sums}); the run is not in sync")
    return sums


@contextmanager
def ema_weights(ema, parameters):
    """Evaluate with the EMA weights, then put the trained weights back."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def train(config) -> dict:
    """Run GRPO as configured; returns the summary also written to ``<run_dir>/summary.json``."""
    # ---------------------------------------------------------------- setup
    train_steps = num_train_steps(config)
    accelerator = Accelerator(
        # On a machine without CUDA, ranks started by torchrun join a gloo process group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=[t for t in config.tracker.split(",") if t] or None,
        # Trackers write to <logdir>/<run name> (the run name is the tracker project name).
        project_config=ProjectConfiguration(project_dir=config.logdir, logging_dir=config.logdir),
        # Every trained step of every rollout batch is one backward pass.
        gradient_accumulation_steps=config.train.gradient_accumulation_steps * train_steps,
    )
    init_logging(accelerator)
    # Everything that can be checked without loading a model (settings, model folders, the data,
    # the checkpoint to resume from) is checked before anything is written.
    validate_config(config, accelerator.num_processes, check_files=True)
    train_set = ReferenceVideoDataset(config.dataset, "train")
    test_set = ReferenceVideoDataset(config.dataset, "test")
    resume = resolve_checkpoint(config.resume_from) if config.resume_from else None
    # A resumed run continues in its own folder; a new one gets a fresh, never-reused folder.
    run_dir = resume.parent.parent if resume is not None else make_unique_dir(config.logdir, config.run_name or "run",
                                                                             accelerator)
    run_name = run_dir.name
    set_seed(config.seed, device_specific=True)
    if accelerator.is_main_process:
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
        accelerator.init_trackers(run_name, config=flat_config(config), init_kwargs={
            "wandb": {"name": run_name, "id": run_name, "resume": "allow", "dir": str(run_dir)}})
    logger.info("resolved config:\n%s", config)
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32

    dtype = DTYPES[config.mixed_precision]
    pipeline = load_rollout_pipeline(config, accelerator.device, dtype)
    if config.train.cache_prompt_embeds:  # every prompt encoded now; the text encoder leaves the accelerator
        pipeline.cache_prompt_embeds(run_prompts(config, train_set, test_set), config.sample.max_sequence_length)
    if config.context_parallel_degree > 1:  # before peft and DDP wrap it: the hooks sit on diffusers' modules
        enable_context_parallel(pipeline.transformer, config.context_parallel_degree)
    transformer = add_lora(pipeline.transformer, config)
    forward_process = config.algorithm != "grpo"
    if forward_process:
        add_old_policy(transformer)  # the sampling policy: a frozen copy, EMA'd after every epoch
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    # FSDP2 (accelerate config fsdp2*.yaml): shard before the optimizer is built on the shards.
    fsdp = fsdp2_plugin(accelerator)
    if fsdp is not None:
        shard_transformer(transformer, fsdp, fsdp2_mesh(accelerator), dtype)
    pipeline.transformer = transformer
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.train.learning_rate, betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon,
    )
    if fsdp is not None and accelerator.distributed_type != DistributedType.FSDP:
        # CPU ranks (accelerate's MULTI_CPU would wrap the sharded model in DDP): the optimizer only.
        optimizer = accelerator.prepare(optimizer)
    else:  # accelerate's FSDP2 leaves the sharded model as it is
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    # After prepare: DDP has broadcast rank 0's LoRA initialisation, so every rank's EMA starts equal.
    ema = EMAModel(trainable, decay=config.train.ema_decay) if config.train.ema else None
    first_epoch, global_step = 0, 0
    if resume is not None:
        state = load_checkpoint(resume, peft_model=accelerator.unwrap_model(transformer), optimizer=optimizer, ema=ema,
                                old_policy=forward_process)
        first_epoch, global_step = state["epoch"], state["global_step"]
        # Only once the checkpoint has loaded into this model: a failed resume moves nothing.
        if accelerator.is_main_process:
            set_aside_later_checkpoints(resume)  # else "resume from the run folder" would pick them

    ranks = data_ranks(accelerator, config)
    sampler = KRepeatSampler(
        train_set.reference_counts, batch_size=config.sample.train_batch_size,
        group_size=config.sample.num_image_per_prompt, num_replicas=ranks.size, rank=ranks.rank, seed=config.seed,
    )
    reward_fn = build_reward_fn(config, accelerator.device)
    if config.reward_model.offload:  # on the accelerator only while sampling and evaluating
        reward_fn.to("cpu")
    on_device = dict(reward_fn=reward_fn, device=accelerator.device, offload=config.reward_model.offload)
    executor = ThreadPoolExecutor(max_workers=1)

    videos_per_epoch = config.sample.train_batch_size * ranks.size * config.sample.num_batches_per_epoch
    logger.info(
        "***** %s *****\n  processes = %d (context-parallel degree %d)\n  videos per sampling batch (all ranks) = %d"
        "\n  groups per epoch = %d "
        "(K = %d)\n  videos per epoch = %d\n  trained steps per video = %d of %d\n  optimizer steps per epoch = %d"
        "\n  train rows = %d, test rows = %d",
        config.algorithm.upper(), accelerator.num_processes, ranks.degree, config.sample.train_batch_size * ranks.size,
        videos_per_epoch // config.sample.num_image_per_prompt, config.sample.num_image_per_prompt,
        videos_per_epoch, train_steps, config.sample.num_steps,
        config.sample.num_batches_per_epoch // config.train.gradient_accumulation_steps * config.train.num_inner_epochs,
        len(train_set), len(test_set),
    )

    # ---------------------------------------------------------------- epochs
    first_eval = None
    zero_advantage_epochs = []
    for epoch in range(first_epoch, config.num_epochs):
        if config.eval_freq and epoch % config.eval_freq == 0:
            with ema_weights(ema, trainable), reward_models_on(**on_device):
                means, rows = evaluate(pipeline, test_set, reward_fn, config, accelerator)
            if first_eval is None and config.eval_videos:  # the "before" videos of the report's gallery
                log_eval_videos(run_dir / "eval" / f"epoch_{epoch:05d}", rows, test_set, config.video_fps)
            first_eval = first_eval or means
            accelerator.log({f"eval/{k}": v for k, v in means.items()}, step=global_step)
            logger.info("epoch %d eval: %s", epoch, means)

        transformer.eval()
        with active_adapter(accelerator.unwrap_model(transformer), OLD) if forward_process else nullcontext(), \
                reward_models_on(**on_device):
            batches = sample_epoch(epoch, config, accelerator, pipeline, train_set, sampler, reward_fn, executor)
        reward_metrics = assign_advantages(batches, config, accelerator)
        accelerator.log({**reward_metrics, "epoch": epoch}, step=global_step)
        logger.info("epoch %d rewards: %s", epoch, reward_metrics)
        if reward_metrics["reward/zero_advantage_fraction"] == 1.0:
            zero_advantage_epochs.append(epoch)
            logger.warning(
                "epoch %d: EVERY ADVANTAGE IS 0 (the rewards are equal within each of the %d groups), so this epoch "
                "teaches the policy nothing; check that the rewards in reward_fn vary between videos "
                "(reward/<name> in the log) and that their weights are not 0", epoch, reward_metrics["reward/num_groups"])
        if accelerator.is_main_process and config.log_videos_freq and epoch % config.log_videos_freq == 0:
            log_rollout_videos(run_dir / "videos" / f"epoch_{epoch:05d}", batches[0].inputs, batches[0].rewards,
                               config.log_videos_count, config.video_fps, accelerator=accelerator, step=global_step)
        if accelerator.is_main_process:
            append_jsonl(run_dir / "metrics.jsonl", {"epoch": epoch, "step": global_step, **reward_metrics})

        transformer.train()
        global_step = train_epoch(epoch, global_step, config, accelerator, pipeline, transformer, optimizer, ema,
                                  batches)
        if forward_process:
            update_old_policy(accelerator.unwrap_model(transformer),
                              old_policy_decay(global_step, config.nft.old_policy_decay_type))
        if config.save_freq and (epoch + 1) % config.save_freq == 0:
            # On every rank (FSDP2 gathers the shards); the main process writes.
            save_checkpoint(run_dir, epoch=epoch + 1, global_step=global_step, optimizer=optimizer, ema=ema,
                            peft_model=accelerator.unwrap_model(transformer),
                            limit=config.num_checkpoint_limit,
                            old_policy=old_policy_state(accelerator.unwrap_model(transformer))
                            if forward_process else None, is_main_process=accelerator.is_main_process)
            accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- finish
    # The weights are written before the final evaluation (eval size and steps: the longest
    # sampling of the run), so a failure there loses no training.
    checksums = replica_checksums(trainable, accelerator)
    with reporting_write_errors(run_dir / "lora", "the trained LoRA"):  # every rank gathers, the main one writes
        save_lora(accelerator.unwrap_model(transformer), run_dir, is_main_process=accelerator.is_main_process)
        if ema is not None:
            with ema_weights(ema, trainable):
                save_lora(accelerator.unwrap_model(transformer), run_dir / "ema",
                          is_main_process=accelerator.is_main_process)
    with ema_weights(ema, trainable), reward_models_on(**on_device):
        means, rows = evaluate(pipeline, test_set, reward_fn, config, accelerator)
    if config.eval_videos:
        log_eval_videos(run_dir / "eval" / f"epoch_{config.num_epochs:05d}", rows, test_set, config.video_fps)
    accelerator.log({f"eval/{k}": v for k, v in means.items()}, step=global_step)
    summary = {"run_dir": str(run_dir), "eval_before": first_eval, "eval_after": means, "lora_checksums": checksums,
               # Epochs whose update had nothing to learn from (warned about when they ran).
               "zero_advantage_epochs": zero_advantage_epochs}
    if zero_advantage_epochs:
        logger.warning("%d of %d epochs had only zero advantages (epochs %s); see summary.json",
                       len(zero_advantage_epochs), config.num_epochs - first_epoch, zero_advantage_epochs)
    if accelerator.is_main_process:
        write_json(run_dir / "summary.json", summary)
        for key in means:
            before = f"{first_eval[key]:.4f}" if first_eval else "n/a"
            logger.info("eval %s: before %s -> after %.4f", key, before, means[key])
        logger.info("LoRA and summary written to %s", run_dir)
    executor.shutdown()
    accelerator.end_training()
    # After end_training, which flushes and closes the tracker files the report reads.
    if config.report and accelerator.is_main_process:
        logger.info("report: %s", write_report([run_dir]))
        grid = before_after_png(run_dir)
        if grid is not None:
            logger.info("references | before | after, per test row: %s", grid)
    return summary


def main(_):
    train(FLAGS.config)


if __name__ == "__main__":
    app.run(main)
