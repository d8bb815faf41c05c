"""Presets. Each returns base.get_config() with overrides; pick one with
``--config config/dgx.py:NAME``. Fields and their meaning: config/base.py."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("identity_grpo_base_config", os.path.join(os.path.dirname(__file__), "base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def vace():
    """Wan2.1-VACE-1.3B with the upstream Identity-GRPO hyper-parameters (8 GPUs x 4 videos)."""
    config = base.get_config()
    config.run_name = "vace_identity_grpo"
    config.model_type = "vace"
    config.pretrained.model = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
    config.pretrained.reward_model = "outputs/identity_reward"
    config.height, config.width, config.frames = 240, 416, 33
    config.eval_height, config.eval_width, config.eval_frames = 480, 832, 81
    config.sample.num_steps = 25
    config.sample.eval_num_steps = 50
    config.sample.guidance_scale = 4.5
    config.sample.train_batch_size = 4
    config.sample.num_image_per_prompt = 8
    config.sample.num_batches_per_epoch = 8
    config.sample.test_batch_size = 2
    config.sample.global_std = False
    config.sample.noise_schedule = "identity_grpo"
    config.sample.noise_level = 1.0
    config.sample.negative_prompt = base.WAN_NEGATIVE_PROMPT
    # Every step is an SDE step; the first 24 of 25 are trained.
    config.sample.untrained_steps = "sde"
    # Upstream pins diffusers 0.35.0: its UniPC sigma table, whatever diffusers is installed.
    config.sample.sigma_table = "v0.35"
    # Upstream: num_batches_per_epoch // 2 sampling batches per optimizer step.
    config.train.gradient_accumulation_steps = 4
    config.train.num_inner_epochs = 1
    config.train.timestep_fraction = 0.99
    config.train.beta = 0.004
    config.train.learning_rate = 1e-4
    config.train.clip_range = 1e-3
    config.train.filter_zero_advantage = "sample"
    config.train.lora_rank, config.train.lora_alpha = 32, 32
    # Upstream's EMA: decay 0.9, after every 8th optimizer step, once per sampling batch.
    config.train.ema = True
    config.train.ema_decay = 0.9
    config.train.ema_update_interval = 8
    config.train.ema_per_sampling_batch = True
    config.reward_model.fps = 10.0
    config.mixed_precision = "bf16"
    config.save_freq = 5
    config.eval_freq = 5
    config.num_epochs = 100000  # stopped by hand, as upstream
    config.reward_fn = {"identity": 1.0}
    return config


def vace14b():
    """Wan2.1-VACE-14B (diffusers) with ``vace``'s GRPO settings and sizes, sharded with FSDP2 over
    8 GPUs of a node (the bf16 transformer is 28 GB, the base replicated per GPU under DDP):

        accelerate launch --config_file scripts/accelerate_configs/fsdp2.yaml \
            train_wan2_1_vace.py --config config/dgx.py:vace14b

    Several nodes: scripts/accelerate_configs/fsdp2_hybrid_multi_node.yaml (sharded within a
    node, replicated across nodes). Gradient checkpointing stays on (``vace``'s default). Not yet
    run on GPUs; the 1.3B architecture's real-size CPU test and the FSDP2 CPU tests are what is
    verified (docs/performance.md).
    """
    config = vace()
    config.run_name = "vace14b_identity_grpo"
    config.pretrained.model = "Wan-AI/Wan2.1-VACE-14B-diffusers"
    config.train.gradient_checkpointing = True
    return config


def tiny():
    """Tiny random models built offline on first use: the CPU quick start and the tests.

    About 1 s an epoch on 2 CPU cores. Learns the cheap ``ref_tone`` pixel reward; the tiny
    identity reward model is scored alongside with weight 0 (logged, not optimised), since a
    random reward model has nothing to teach.
    """
    config = base.get_config()
    config.run_name = "tiny"
    config.pretrained.model = "outputs/tiny_models/wan_vace"
    config.pretrained.reward_model = "outputs/tiny_models/identity_reward"
    config.pretrained.build_tiny = True
    config.mixed_precision = "no"
    config.height, config.width, config.frames = 32, 32, 5
    config.eval_height, config.eval_width, config.eval_frames = 32, 32, 5
    config.sample.num_steps = 4
    config.sample.eval_num_steps = 4
    config.sample.guidance_scale = 4.5
    config.sample.max_sequence_length = 16
    config.sample.noise_level = 0.5
    config.sample.train_batch_size = 32
    config.sample.num_image_per_prompt = 8
    config.sample.num_batches_per_epoch = 1
    config.sample.test_batch_size = 8
    config.train.gradient_accumulation_steps = 1
    config.train.learning_rate = 5e-3
    config.train.clip_range = 0.2
    config.train.beta = 0.0
    config.train.lora_rank = 8
    config.train.lora_alpha = 16
    config.train.gradient_checkpointing = False
    config.train.ema = False
    config.num_epochs = 60
    config.save_freq = 0
    config.eval_freq = 30
    # Evaluate the trained objective itself (SDE, fixed noise): a random tiny model's SDE and ODE
    # samplers do not share marginals, so the ODE reward need not follow the SDE reward.
    config.sample.eval_sde = True
    config.reward_fn = {"ref_tone": 1.0, "identity": 0.0}
    return config


# The tiny world's own checks (identity_grpo/rewards/world.py), logged beside what a preset trains.
WORLD_CHECKS = {"world_identity": 0.0, "world_identity_soft": 0.0, "world_extra_people": 0.0}


def tiny_world():
    """The tiny world (docs/tiny_world.md): a VAE and VACE transformer trained for real on a
    synthetic reference-to-video world of 24 cartoon people, shipped in ``dataset/tiny_world``
    (rebuild with ``python scripts/build_tiny_world.py``). Unlike ``tiny``, its sampler is a
    trained model, so evaluation uses the ODE as the real presets do, on held-out test rows.

    Trains ``identity`` alone, the paper's setting: the mean of the world's four learned reward
    models (the Qwen2.5-VL reward-token architecture at toy size, trained on preferences between
    the world's videos), and logs the world's identity check (are the generated people the
    referenced ones: skin, hair colour, hair style), hard (``world_identity``) and soft
    (``world_identity_soft``, what the DiffusionNFT and EvoID presets train), and how many people
    more than referenced a video draws (``world_extra_people``). Learning
    rate 1e-3: 3e-3 and 5e-3 wreck the generator's identity, and 2e-3 over-optimised a reward
    model (measured, docs/tiny_world.md). 64 videos an epoch: 5-10 minutes on 2 CPU cores.
    """
    config = tiny()
    config.run_name = "tiny_world"
    config.dataset = "dataset/tiny_world"
    config.pretrained.model = "dataset/tiny_world/models/wan_vace"
    # The world's four reward models (seeds 0-3), averaged (docs/tiny_world.md).
    config.pretrained.reward_model = ",".join(
        f"dataset/tiny_world/models/identity_reward_seed{seed}" for seed in range(4))
    config.pretrained.build_tiny = False
    config.sample.num_steps = 8
    config.sample.eval_num_steps = 8
    # Guidance 1.0: the tiny generator's unconditional branch is too weak for CFG (measured).
    config.sample.guidance_scale = 1.0
    config.sample.noise_level = 0.7
    config.sample.eval_sde = False
    # 64 videos an epoch (eight groups of 8): less noise in each update than 32, with which GRPO
    # could not climb an earlier reward model's score for 3 of 4 seeds
    # (docs/tiny_world_reward_history.md).
    config.sample.train_batch_size = 64
    config.train.learning_rate = 1e-3
    config.num_epochs = 30
    config.eval_freq = 30
    # On 96 + 96 held-out scenes (python -m identity_grpo.world.following) the identity check rose
    # for 6 of 6 seeds (+15% to +39%) and fell with the sign flipped (-60%); on the mean of two of
    # these models, for 4 of 4 seeds with one pair and 2 of 4 with the other (docs/tiny_world.md).
    # Logged at weight 0: the world's identity check, hard and soft, and how many people more than
    # referenced a video draws (it rises under the reward models: docs/tiny_world.md).
    config.reward_fn = {"identity": 1.0, **WORLD_CHECKS}
    return config


# The world's soft identity check as the trained reward, the learned ones logged: what the
# DiffusionNFT and EvoID presets of the world were measured with (docs/tiny_world.md).
WORLD_SOFT_CHECK = {**WORLD_CHECKS, "world_identity_soft": 1.0, "identity": 0.0}


def tiny_world_phantom():
    """``tiny_world`` on the world's Phantom generator (``models/wan_phantom``: the Wan T2V
    architecture with the references appended as latent frames, trained on the same scenes with
    the same VAE and text encoder as the VACE one; docs/tiny_world.md). Guidance off, as in
    ``tiny_world``; the folder's scheduler (shift 3, what it was trained with), not Phantom's 5.
    Trains ``tiny_world``'s reward, the mean of the four reward models (trained on the VACE
    generator's samples): on 96 + 96 held-out scenes the identity check rose for 3 of 3 seeds
    (+26%, +8%, +20%) and fell with the sign flipped (-53%), at 32 videos an epoch
    (docs/tiny_world.md)."""
    config = tiny_world()
    config.run_name = "tiny_world_phantom"
    config.sample.train_batch_size = 32
    config.model_type = "phantom"
    config.pretrained.model = "dataset/tiny_world/models/wan_phantom"
    config.pretrained.phantom_dit = "dataset/tiny_world/models/wan_phantom"
    return config


def tiny_world_reward():
    """``tiny_world`` for a reward of your own (docs/tiny_world.md, "A reward of your own"): the
    settings under which GRPO raised three rewards no test trains (contrast, saturation,
    rightward) for 3 of 3 seeds and lowered them for 3 of 3 with the sign flipped, and then four
    more written later (sharpness, blueness, foreground, and stillness in 40 epochs): 32 videos an
    epoch (four groups of 8, 7 of the 8 steps trained), lr 3e-3, 20 epochs. Name the reward, and
    the file that registers it:

        python train_wan2_1_vace.py --config config/dgx.py:tiny_world_reward \
            --config.reward_modules=my_rewards.py "--config.reward_fn={'my_reward': 1.0}"

    Defaults to ``brightness``. 2-4 minutes on 2 CPU cores.
    """
    config = tiny_world()
    config.run_name = "tiny_world_reward"
    config.sample.train_batch_size = 32
    config.train.learning_rate = 3e-3
    config.num_epochs = 20
    config.eval_freq = 20
    config.reward_fn = {"brightness": 1.0}
    return config


def phantom():
    """Phantom-Wan-1.3B with the same GRPO hyper-parameters and training sizes as ``vace``.

    Sampling follows Phantom's released defaults: image / text guidance 5.0 / 7.5, flow shift 5.0,
    50 evaluation steps at 480x832 (H x W), 81 frames. Guide: docs/phantom.md.
    """
    config = vace()
    config.run_name = "phantom_identity_grpo"
    config.model_type = "phantom"
    # Wan2.1-T2V-1.3B (diffusers): tokenizer, UMT5, VAE, scheduler and the DiT's architecture.
    config.pretrained.model = "Wan-AI/Wan2.1-T2V-1.3B-diffusers"
    # Phantom's DiT: the released original-format .pth (converted on load) or a converted
    # diffusers transformer folder.
    config.pretrained.phantom_dit = "checkpoints/Phantom-Wan-1.3B/Phantom-Wan-1.3B.pth"
    return _phantom_sampling(config)


def phantom14b():
    """Phantom-Wan-14B with ``phantom``'s GRPO settings, sizes and sampling defaults (Phantom's
    ``generate.py`` takes the same guidance and shift flags for both sizes), sharded with FSDP2
    over 8 GPUs of a node:

        accelerate launch --config_file scripts/accelerate_configs/fsdp2.yaml \
            train_wan2_1_vace.py --config config/dgx.py:phantom14b

    The DiT is released as sharded safetensors; ``pretrained.phantom_dit`` is their index, with
    the shards beside it. Not yet run on GPUs.
    """
    config = phantom()
    config.run_name = "phantom14b_identity_grpo"
    config.pretrained.model = "Wan-AI/Wan2.1-T2V-14B-diffusers"
    config.pretrained.phantom_dit = "checkpoints/Phantom-Wan-14B/Phantom_Wan_14B.safetensors.index.json"
    config.train.gradient_checkpointing = True
    return config


def _phantom_sampling(config):
    """Phantom's released sampling defaults, shared by ``phantom`` and ``phantom_tiny``."""
    # s_img: weight of (refs + negative) - (no refs + negative), how strongly the references act.
    config.sample.image_guidance_scale = 5.0
    # s_text: weight of (refs + prompt) - (refs + negative), how strongly the prompt acts.
    config.sample.text_guidance_scale = 7.5
    # For Phantom, > 1 switches the three-branch guidance on and 1.0 off; keep it equal to
    # text_guidance_scale (a different value > 1 is rejected by validate_config).
    config.sample.guidance_scale = 7.5
    # Flow-matching shift of the sigma schedule (Phantom: 5.0; Wan2.1-T2V's folder has 3.0).
    config.sample.flow_shift = 5.0
    # The official Phantom grid, linspace(0.999, 0, N + 1)[:-1] shifted, is diffusers 0.35's table.
    config.sample.sigma_table = "v0.35"
    return config


def phantom_tiny():
    """``tiny`` with a tiny random Phantom checkpoint built offline on first use: a diffusers
    T2V folder plus an original-format ``phantom_dit.pth`` inside it (exercises the conversion)."""
    config = tiny()
    config.run_name = "phantom_tiny"
    config.model_type = "phantom"
    config.pretrained.model = "outputs/tiny_models/wan_t2v_phantom"
    config.pretrained.phantom_dit = "outputs/tiny_models/wan_t2v_phantom/phantom_dit.pth"
    return _phantom_sampling(config)


def _nft(config):
    """DiffusionNFT's settings (its config/nft.py) on top of a preset: 10-step deterministic
    collection with the second-order solver, CFG-free, beta 1.0, 9 of the 10 sampler timesteps
    trained per sample, old policy decay type 1, KL weight 1e-4."""
    config.algorithm = "nft"
    config.sample.num_steps = 10
    config.sample.guidance_scale = 1.0
    config.sample.eval_solver = "scheduler"
    config.nft.beta = 1.0
    config.nft.num_timesteps = 0  # floor(10 * 0.99) = 9
    config.nft.timestep_sampling = "sampler"
    config.nft.old_policy_decay_type = 1
    config.train.timestep_fraction = 0.99
    config.train.beta = 1e-4
    return config


def _evoid(config):
    """EvoID's anchors on top of a DiffusionNFT preset, at the paper's weights: the text-to-video
    teacher 0.01, the initial model 0.2."""
    config.algorithm = "evoid"
    config.evoid.lambda_t2v, config.evoid.lambda_self = 0.01, 0.2
    return config


def vace_nft():
    """``vace`` trained with DiffusionNFT instead of GRPO (same data, reward, sizes, LoRA)."""
    config = _nft(vace())
    config.run_name = "vace_nft"
    config.train.learning_rate = 3e-4  # DiffusionNFT's
    return config


def phantom_nft():
    """``phantom`` trained with DiffusionNFT; Phantom's three-branch guidance is off (CFG-free)."""
    config = _nft(phantom())
    config.run_name = "phantom_nft"
    config.train.learning_rate = 3e-4
    return config


def tiny_nft():
    """``tiny`` with DiffusionNFT: 4-step deterministic collection, CFG-free."""
    config = _nft(tiny())
    config.run_name = "tiny_nft"
    config.sample.num_steps = 4
    config.sample.eval_num_steps = 4
    config.sample.eval_sde = False
    config.train.beta = 0.0
    return config


def vace_evoid():
    """``vace_nft`` plus EvoID's anchors (T2V teacher 0.01, initial model 0.2). EvoID combines
    several rewards with its dynamic weighting (``reward_combination.mode = "evoid"``, see
    docs/rewards.md); set ``reward_fn`` and its groups for that; the identity reward alone is kept here."""
    config = _evoid(vace_nft())
    config.run_name = "vace_evoid"
    return config


def phantom_evoid():
    """``phantom_nft`` plus EvoID's anchors (T2V teacher 0.01, initial model 0.2). The teacher is
    the transformer of ``pretrained.model``: Wan2.1-T2V-1.3B, the model Phantom was fine-tuned
    from (``pretrained.teacher`` to use another)."""
    config = _evoid(phantom_nft())
    config.run_name = "phantom_evoid"
    return config


def tiny_world_nft():
    """``tiny_world`` trained with DiffusionNFT: 8-step deterministic collection (the world's
    sampler), CFG-free, KL weight 0."""
    config = _nft(tiny_world())
    config.run_name = "tiny_world_nft"
    # 32 videos an epoch, as benchmarked against GRPO (docs/tiny_world.md).
    config.sample.train_batch_size = 32
    config.sample.num_steps = 8
    config.sample.eval_num_steps = 8
    config.train.beta = 0.0
    config.reward_fn = dict(WORLD_SOFT_CHECK)
    return config


def tiny_world_phantom_nft():
    """``tiny_world_nft`` on the world's Phantom generator (``tiny_world_phantom``'s model and
    guidance): DiffusionNFT's forward-process objective on the Phantom-Wan architecture."""
    config = tiny_world_nft()
    phantom = tiny_world_phantom()
    config.run_name = "tiny_world_phantom_nft"
    config.model_type = phantom.model_type
    config.pretrained.model = phantom.pretrained.model
    config.pretrained.phantom_dit = phantom.pretrained.phantom_dit
    return config


def tiny_world_phantom_evoid():
    """``tiny_world_phantom_nft`` with EvoID's anchors (0.01 / 0.2, as ``tiny_world_evoid``). The
    text-to-video teacher is ``pretrained.model``'s transformer, as for the real Phantom: here the
    world's Phantom DiT itself, on the video frames alone (the world has no T2V model; this DiT
    never trained without references, so it is a weak teacher)."""
    config = _evoid(tiny_world_phantom_nft())
    config.run_name = "tiny_world_phantom_evoid"
    return config


def tiny_world_evoid():
    """``tiny_world_nft`` with EvoID's anchors (the world's VACE with its context off as the
    text-to-video teacher, 0.01; the initial model, 0.2)."""
    config = _evoid(tiny_world_nft())
    config.run_name = "tiny_world_evoid"
    return config


def tiny_evoid():
    """``tiny_nft`` with EvoID's anchors."""
    config = _evoid(tiny_nft())
    config.run_name = "tiny_evoid"
    return config


def get_config(name):
    presets = {"vace": vace, "vace14b": vace14b, "tiny": tiny, "phantom": phantom, "phantom14b": phantom14b,
               "phantom_tiny": phantom_tiny, "vace_nft": vace_nft, "phantom_nft": phantom_nft, "tiny_nft": tiny_nft,
               "vace_evoid": vace_evoid, "phantom_evoid": phantom_evoid, "tiny_evoid": tiny_evoid,
               "tiny_world": tiny_world, "tiny_world_nft": tiny_world_nft, "tiny_world_evoid": tiny_world_evoid,
               "tiny_world_phantom": tiny_world_phantom, "tiny_world_reward": tiny_world_reward,
               "tiny_world_phantom_nft": tiny_world_phantom_nft, "tiny_world_phantom_evoid": tiny_world_phantom_evoid}
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]()
