"""Every configuration field, with its default and meaning. Presets in ``dgx.py`` override these.

Override any field on the command line: ``--config config/dgx.py:vace --config.train.beta=0.01``.
"""

import ml_collections

# Wan2.1's standard negative prompt (its own pipelines' default; upstream Identity-GRPO passes it
# when sampling and training). Roughly: garish colours, overexposed, static, blurry details,
# subtitles, style, artwork, painting, still frame, greyish, worst quality, low quality, JPEG
# artefacts, ugly, mutilated, extra fingers, badly drawn hands or face, deformed, disfigured,
# malformed limbs, fused fingers, motionless picture, cluttered background, three legs, crowded
# background, walking backwards.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- run
    # Name of the run: its folder under `logdir` and its tracker name. Empty: a timestamp.
    config.run_name = ""
    # Base seed: rollout noise, the prompt sampler and LoRA init derive from it.
    config.seed = 42
    # Root folder of runs: <logdir>/<run_name>/{checkpoints,tracker files,videos}.
    config.logdir = "outputs/identity_grpo"
    # Number of epochs (one epoch = sample num_batches_per_epoch batches, then train on them).
    config.num_epochs = 100
    # Save a checkpoint every this many epochs (0 disables saving).
    config.save_freq = 5
    # Evaluate on test.csv every this many epochs (0 disables evaluation).
    config.eval_freq = 5
    # Keep at most this many checkpoints (older ones are deleted after a new one is complete).
    config.num_checkpoint_limit = 5
    # "no", "fp16" or "bf16": dtype of the frozen weights and of autocast in the transformer.
    config.mixed_precision = "bf16"
    # Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise fp32).
    config.allow_tf32 = True
    # Resume from a run folder (its latest complete checkpoint) or one checkpoint folder.
    config.resume_from = ""
    # Trackers for accelerator.log: "tensorboard", "wandb", or "tensorboard,wandb"; "" for none.
    config.tracker = "tensorboard"
    # Batch inference (test_wan2_1_vace.py): parent folder of its output folders ("" = logdir),
    # fps of the written videos, and whether to also generate with the LoRA disabled and report
    # base vs LoRA side by side.
    config.test_save_dir = ""
    config.video_fps = 16
    config.eval_baseline = False
    # Every this many epochs, write the first log_videos_count rollouts of the epoch (mp4 with
    # their references and rewards) to <run>/videos/epoch_<n>/ and send them to the trackers
    # (tensorboard: a frame-grid image; wandb: the videos) (0 disables).
    config.log_videos_freq = 10
    config.log_videos_count = 4
    # Write the first and the final evaluation's videos (mp4 with their references and rewards)
    # to <run>/eval/epoch_<n>/: the report's gallery and before_after.png read them. False (needs
    # report=False) keeps only the logged means, for runs compared by their numbers alone.
    config.eval_videos = True
    # At the end of a run (train and test scripts), write <run>/report.html: reward curves, the
    # before/after video gallery with references and scores, the config (docs/report.md).
    config.report = True
    # diffusers attention backend of the transformer ("flash", "native", "_native_cudnn", ...).
    # Empty: "flash" when flash-attn is importable on CUDA, else "native" (PyTorch SDPA).
    config.attention_backend = ""
    # Context parallelism (diffusers' Ulysses attention, identity_grpo/context_parallel.py): this
    # many ranks run ONE batch together, each holding 1/degree of the video tokens (activations
    # shrink by the degree: long videos). 1: off. For now it must equal the number of processes
    # (one context-parallel group; data x context parallelism needs a 2-D mesh) and divide the
    # transformer's attention heads (1.3B: 12, 14B: 40); not with FSDP2.
    config.context_parallel_degree = 1
    # Which base model family: "vace" (Wan2.1-VACE, diffusers) or "phantom" (Phantom-Wan).
    config.model_type = "vace"

    # ---------------------------------------------------------------- data
    # Dataset folder holding train.csv and test.csv (columns ref_paths, prompt) and the images.
    config.dataset = "dataset/generated_img"
    # Training rollouts: video height and width in pixels (divisible by 16) and frames (4k + 1).
    config.height = 240
    config.width = 416
    config.frames = 33
    # Evaluation videos: size and frames, usually larger than during training.
    config.eval_height = 480
    config.eval_width = 832
    config.eval_frames = 81

    # ---------------------------------------------------------------- models
    config.pretrained = pretrained = ml_collections.ConfigDict()
    # Base video model: a local diffusers folder or a hub id (hub ids need network access).
    pretrained.model = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
    # If true and `model` is a missing local folder inside a folder named `tiny_models/`, write
    # tiny random models there first (the offline quick start and tests; never set for real runs;
    # any other missing path is refused, so a typo never builds random models).
    pretrained.build_tiny = False
    # Phantom only: the Phantom DiT, an original-format .pth or a converted diffusers transformer
    # folder (`model` is then the Wan2.1-T2V-1.3B diffusers folder). See docs/phantom.md.
    pretrained.phantom_dit = ""
    # EvoID only: its frozen text-to-video teacher, a diffusers WanTransformer3DModel folder (a
    # Wan2.1-T2V-1.3B diffusers folder, whose `transformer` is used, or a transformer folder).
    # Empty: VACE uses its own base with the VACE context switched off (exactly the T2V
    # transformer on VACE's base weights); Phantom the transformer of `model`, the Wan2.1-T2V-1.3B
    # that Phantom was fine-tuned from.
    pretrained.teacher = ""
    # Identity reward model folder (see vace_reward), used by the "identity" reward.
    pretrained.reward_model = "outputs/identity_reward"

    # ---------------------------------------------------------------- sampling
    config.sample = sample = ml_collections.ConfigDict()
    # Denoising steps of a training rollout, and of evaluation.
    sample.num_steps = 25
    sample.eval_num_steps = 50
    # Classifier-free guidance scale (1.0 disables CFG and halves the transformer batch).
    sample.guidance_scale = 4.5
    # Phantom only: image and text guidance scales of its three-branch guidance
    # (neg + s_img (pos_i - neg) + s_text (pos_it - pos_i)); guidance_scale only switches it: = s_text on, 1.0 off.
    sample.image_guidance_scale = 5.0
    sample.text_guidance_scale = 7.5
    # Phantom only: flow shift of the sigma schedule (0 keeps the scheduler folder's value).
    sample.flow_shift = 0.0
    # Sigma table of flow UniPC schedulers (Wan2.1's): "installed" (the installed diffusers') or
    # "v0.35" (diffusers 0.35's, which upstream pins; 0.37 moved every sigma, by up to 0.0026 at
    # 25 steps). Other schedulers always use their own. See identity_grpo/schedules.py.
    sample.sigma_table = "installed"
    # Solver of evaluation and batch inference (deterministic sampling): "scheduler" (the
    # scheduler's own step: Wan's 2nd-order UniPC, so the video equals the stock pipeline's) or
    # "euler" (first-order, what upstream Identity-GRPO evaluates with). Training rollouts always
    # use the SDE, and Euler for their deterministic steps (window / fast modes).
    sample.eval_solver = "scheduler"
    # Negative prompt for CFG, in sampling and training; encoded once per run. The `vace` and
    # `phantom` presets use WAN_NEGATIVE_PROMPT (above), as upstream does.
    sample.negative_prompt = ""
    # Max tokens of the UMT5 prompt encoder (Wan uses 512).
    sample.max_sequence_length = 512
    # Scale of the VACE control stream added to the transformer blocks.
    sample.conditioning_scale = 1.0
    # Videos per rank per sampling batch.
    sample.train_batch_size = 4
    # Group size K: videos generated per (prompt, references) draw; advantages compare within it.
    # train_batch_size x num_processes must be divisible by it.
    sample.num_image_per_prompt = 8
    # Sampling batches per epoch (each rank); the epoch trains on all of them.
    sample.num_batches_per_epoch = 8
    # Videos per rank per evaluation batch.
    sample.test_batch_size = 2
    # Normalise advantages with the std of all rewards (True) or of each group (False).
    sample.global_std = False
    # SDE noise schedule: "identity_grpo" (std = sigma_min + (sigma_max - sigma_min) * sigma),
    # "flow_grpo" (noise_level * sqrt(sigma / (1 - min(sigma, sigma_max)))), "cps"
    # (coefficients-preserving, Flow-GRPO's log-prob -mean((x - mean)^2)) or "cps_exact" (the same
    # sampler scored with the exact Gaussian density). See identity_grpo/sde.py.
    sample.noise_schedule = "identity_grpo"
    # Multiplier of the noise schedule (1.0 reproduces upstream Identity-GRPO; Flow-GRPO uses 0.7).
    sample.noise_level = 1.0
    # Evaluate with the training SDE and fixed noise instead of the deterministic ODE sampler: it
    # measures exactly the objective GRPO optimises (needs eval_num_steps == num_steps).
    sample.eval_sde = False
    # How the steps after the trained ones are sampled (default mode, sde_window_size = 0): "sde"
    # (upstream: every step is an SDE step, only the first floor(num_steps * timestep_fraction) are
    # trained) or "ode" (deterministic Euler steps after the trained ones: a less noisy final video).
    sample.untrained_steps = "sde"
    # Window mode (MixGRPO-style): SDE on a contiguous window of this many steps, its start drawn
    # per sampling batch; ODE elsewhere; only window steps are trained. 0: off (the first
    # floor(num_steps * train.timestep_fraction) steps are SDE and trained).
    sample.sde_window_size = 0
    # Fast mode (Flow-GRPO-Fast): a group shares its initial noise and its ODE prefix (computed
    # once per group on each rank), then branches with the SDE inside the window. Needs
    # sde_window_size > 0; implies same_latent.
    sample.fast_branch = False
    # Give every member of a group the same initial noise (exploration then comes from the SDE).
    sample.same_latent = False
    # Memory (docs/performance.md, "Memory plan"). dtype of the recorded rollout states (latents
    # and next_latents, the bulk of a rollout record): "fp32", "bf16" or "fp16". Below fp32 the
    # recorded steps act on the rounded states and score the rounded actions, so the first
    # update's importance ratio is still exactly 1; the sampled videos move by the rounding.
    sample.store_dtype = "fp32"
    # Move each sampling batch's rollout record to the CPU as soon as it is sampled and back to
    # the accelerator one batch at a time while training (same numbers, less accelerator memory
    # for num_batches_per_epoch > 1; costs a host round trip per batch).
    sample.offload_rollouts = False

    # ---------------------------------------------------------------- algorithm
    # The update: "grpo" (Flow-GRPO / Identity-GRPO: SDE rollouts, recorded log-probs, clipped
    # importance ratio), "nft" (DiffusionNFT: the old policy samples deterministically with the
    # eval solver, only the clean latents are kept, and training re-noises them; identity_grpo/nft.py)
    # or "evoid" (nft plus EvoID's anchors, below).
    config.algorithm = "grpo"
    config.nft = nft = ml_collections.ConfigDict()
    # DiffusionNFT's beta: v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v (1.0; 0.1
    # for several rewards in its paper). Smaller is faster but less stable.
    nft.beta = 1.0
    # Timesteps trained per sample (0: floor(sample.num_steps * train.timestep_fraction), as DiffusionNFT).
    nft.num_timesteps = 0
    # Where they come from: "sampler" (the sampling schedule's own timesteps, shuffled per sample,
    # as DiffusionNFT), "uniform" or "logit_normal" (t = sigmoid(N(0, 1))).
    nft.timestep_sampling = "sampler"
    # Old (sampling) policy after each epoch: decay * old + (1 - decay) * trained, DiffusionNFT's
    # schedules: 0 (copy), 1 (min(0.001 step, 0.5), its default), 2 (0 for 75 steps, then
    # min(0.0075 (step - 75), 0.999)).
    nft.old_policy_decay_type = 1
    # "evoid": EvoID = the nft update (its Stable model is the old adapter) plus two anchors
    # (identity_grpo/evoid.py): lambda_t2v x the squared velocity distance, on the video frames, to
    # a frozen text-to-video teacher (pretrained.teacher), and lambda_self x that to the initial
    # model. VACE and Phantom.
    config.evoid = evoid = ml_collections.ConfigDict()
    evoid.lambda_t2v = 0.01
    evoid.lambda_self = 0.2

    # ---------------------------------------------------------------- training
    config.train = train = ml_collections.ConfigDict()
    # AdamW hyper-parameters.
    train.learning_rate = 1e-4
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 1e-4
    train.adam_epsilon = 1e-8
    # Sampling batches whose gradients are accumulated into one optimizer step (every trained
    # timestep of those batches contributes).
    train.gradient_accumulation_steps = 4
    # Gradient-norm clipping bound.
    train.max_grad_norm = 1.0
    # Passes over one epoch's rollouts.
    train.num_inner_epochs = 1
    # Re-score with CFG during training, exactly as sampled (recommended; False is cheaper but
    # biases the ratio unless guidance_scale is 1).
    train.cfg = True
    # Advantages are clipped to [-adv_clip_max, adv_clip_max].
    train.adv_clip_max = 5.0
    # PPO clip range of the importance ratio. Log-probs are per-element means, so ratios stay
    # close to 1 and the range is small.
    train.clip_range = 1e-3
    # Fraction of the SDE steps of each rollout that are trained (the first ones in time).
    train.timestep_fraction = 0.99
    # Weight of the KL penalty to the frozen base model (LoRA disabled). 0 skips the reference call.
    train.beta = 0.004
    # Multiply advantages by this (-1 trains to LOWER the reward; used by tests as a control).
    train.advantage_sign = 1.0
    # Which samples to leave out of the update because their advantage is 0 (only the KL term
    # would act on them): "sample" (upstream: every sample whose advantage is exactly 0), "group"
    # (the samples of groups whose rewards are all equal) or "none". The number of zero-std groups
    # is logged either way.
    train.filter_zero_advantage = "sample"
    # LoRA on the transformer's attention projections; scale = alpha / rank (upstream: 32 / 32 = 1).
    train.lora_rank = 32
    train.lora_alpha = 32
    train.lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    # Start from this LoRA (peft folder) instead of the base model. Empty: base model.
    train.lora_path = ""
    # Keep an exponential moving average of the LoRA weights (used for evaluation, saved). Its
    # decay after optimizer step n is min((1 + n) / (10 + n), ema_decay) (diffusers' EMAModel
    # warm-up, as upstream's). It is updated after every ema_update_interval-th optimizer step (n
    # with (n + 1) % interval == 0), once, or with ema_per_sampling_batch once per sampling batch
    # of that step: upstream calls it after each batch, and since the weights do not change
    # between those calls this is one update with decay^gradient_accumulation_steps. Upstream: 0.9,
    # every 8th step, per sampling batch (the `vace` preset); ours: 0.99 after every step.
    train.ema = True
    train.ema_decay = 0.99
    train.ema_update_interval = 1
    train.ema_per_sampling_batch = False
    # Recompute activations in the backward pass (less memory, ~30% slower).
    train.gradient_checkpointing = True
    # Encode every prompt of the train and test sets (and the negative prompt) once at start-up,
    # keep the embeddings on the CPU and move the text encoder (UMT5-XXL, ~11 GB in bf16) off the
    # accelerator for the rest of the run. Same embeddings as encoding per batch.
    train.cache_prompt_embeds = False

    # ---------------------------------------------------------------- rewards
    # Reward name -> weight; the weighted sum is the GRPO reward. See identity_grpo/rewards.
    # A weight of 0 scores and logs a reward without optimising it.
    config.reward_fn = ml_collections.ConfigDict({"identity": 1.0})
    # Your own rewards: Python files (paths) or importable modules, comma-separated, imported
    # before the rewards are checked or built so that their @register(...) factories join the
    # registry, e.g. "my_rewards.py" (README, "Rewards").
    config.reward_modules = ""
    # How rewards combine (docs/rewards.md): mode "sum" (weighted sum above), "idcrafter" or
    # "evoid"; level "reward" (combine, then normalise in groups) or "advantage" (normalise each
    # reward in its groups, then combine).
    config.reward_combination = ml_collections.ConfigDict({"mode": "sum", "level": "reward"})

    # ---------------------------------------------------------------- identity reward model
    config.reward_model = reward_model = ml_collections.ConfigDict()
    # Videos per forward pass of the reward model.
    reward_model.batch_size = 4
    # Frames sampled per video and the per-frame pixel bound (0: the model's own, 5 and 399,360
    # for the released model).
    reward_model.num_frames = 0
    reward_model.max_frame_pixels = 0
    # Frame rate declared for the rollout frames. Qwen2.5-VL's temporal positions depend on it.
    # Upstream writes each rollout with diffusers' export_to_video (its default: 10 fps) and the
    # reward model reads the file back, so 10 scores like upstream.
    reward_model.fps = 10.0
    # Score exactly what upstream scores: decoded frames converted to uint8 by truncation (not
    # rounding), each rollout written to mp4 as upstream does (export_to_video, 10 fps, quality
    # 7.5), read back and scored. Slower; for parity studies (docs/upstream.md has the measured
    # difference).
    reward_model.mp4_roundtrip = False
    # Base Qwen2.5-VL folder for reward models in the upstream release layout ("": as recorded).
    reward_model.base_model = ""
    # Keep the reward model on the CPU while the generator trains: it moves to the accelerator
    # before each sampling phase and evaluation and back once every rollout is scored (same scores;
    # frees its ~7.5 GB (Qwen2.5-VL-3B, bf16) during the update, for two host copies per epoch).
    reward_model.offload = False

    # ---------------------------------------------------------------- OpenS2V-Eval metrics (batch inference)
    # Columns OpenS2V/<metric> that test_wan2_1_vace.py adds to every video, base and LoRA, computed
    # as OpenS2V-Eval computes them (identity_grpo/metrics/opens2v_eval.py; docs/rewards.md says
    # which numbers compare with its leaderboard). Weights are local paths only, never downloaded;
    # an empty path turns its metric off; a path that does not exist fails at start-up.
    config.opens2v = opens2v = ml_collections.ConfigDict()
    # Motion: Farneback optical flow of every frame (needs OpenCV only).
    opens2v.motion = True
    # FaceSim-Arc: a local insightface model folder holding a detection and a recognition .onnx
    # file (OpenS2V's: <OpenS2V-Weight>/face_extractor/models/buffalo_l). Also FaceSim-Cur's detector.
    opens2v.face_models_dir = ""
    # The detector's input side (OpenS2V: 320) and score threshold (insightface's default 0.5).
    opens2v.det_size = 320
    opens2v.det_thresh = 0.5
    # FaceSim-Cur: the CurricularFace IR-101 weights file (glint360k_curricular_face_r101_backbone.bin);
    # needs face_models_dir.
    opens2v.curricularface_path = ""
    # Aesthetics: a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) and the LAION
    # aesthetic MLP weights (OpenS2V's aesthetic-model.pth); both or neither.
    opens2v.clip_path = ""
    opens2v.aesthetic_head_path = ""
    # Frames sampled per video for FaceSim and Aesthetics (OpenS2V: 32; Motion uses every frame).
    opens2v.num_frames = 32
    # Clipped zeros in the FaceSim means: "opens2v" (as its code: kept in Arc's, dropped from
    # Cur's), "keep" or "drop" (both alike).
    opens2v.zero_handling = "opens2v"

    return config
