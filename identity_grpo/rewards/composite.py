"""Composite rewards (ID-Crafter, EvoID) and the quality rewards they use (aesthetic, naturalness).

Modes (``config.reward_combination.mode``):

- ``"sum"`` (default): ``total = sum_k w_k * r_k`` with ``w_k = config.reward_fn[k]``.
- ``"idcrafter"``: ``R = w_fid * R_face + w_qual * R_qual`` with
  ``R_face = (1 - gamma) * mean_k(id_k) + gamma * min_k(id_k)`` (the ``facesim`` and ``facesim/min``
  keys; ``gamma`` 0.5, ``w_fid`` 0.6, ``w_qual`` 0.4) and ``R_qual`` the average of the quality
  rewards (``aesthetic``, ``naturalness``) with shares ``config.reward_fn[k] / sum``. The issue
  writes quality as "aesthetic + naturalness"; the average keeps ``R_qual`` in [0, 1] like
  ``R_face``, so 0.6 / 0.4 is the actual split between the two (a sum would double quality's weight).
- ``"evoid"``: rewards grouped (identity / text / quality). Each reward is normalised to [0, 1]
  with its range (``clip((r - lo) / (hi - lo), 0, 1)``, default range [0, 1]); a group's score is the
  share-weighted mean of its rewards (shares from ``config.reward_fn``). Group weights are
  ``p = (1 - gamma) * p_prior + gamma * p_batch`` and ``R = sum_g p_g * G_g``. ``p_batch`` comes
  from a judge; the default ``"rule"`` judge is
  ``p_batch = softmax(-mean_batch(G_g) / temperature)``: the group that scores lowest on this
  batch gets the most weight (temperature 0.2; smaller is greedier; as it grows p_batch tends to uniform).

Levels (``config.reward_combination.level``): ``"reward"`` normalises the combined reward within each
GRPO group; ``"advantage"`` normalises every reward within its group first and then weights the
advantages (:func:`identity_grpo.advantages.weighted_group_advantages`). Both, and EvoID's batch
weights, are computed by :func:`epoch_advantages` on the rewards gathered from all ranks, so every
member of a GRPO group gets the same weights. :class:`CompositeReward` (what ``build_reward_fn``
returns for ``idcrafter`` / ``evoid``) gives the same ``total`` per call for logging and evaluation;
for EvoID its batch is that call's batch.

Config fields read (all optional):

- ``config.reward_combination.mode`` ("sum"), ``.level`` ("reward").
- ``config.reward_combination.idcrafter``: ``gamma`` (0.5), ``w_fid`` (0.6), ``w_qual`` (0.4),
  ``face_key`` ("facesim"; ``<face_key>/min`` must exist too), ``quality_keys``
  (("aesthetic", "naturalness")).
- ``config.reward_combination.evoid``: ``groups`` (group -> reward names; default: identity =
  facesim / identity / ref_similarity / ref_tone, quality = aesthetic / naturalness, text = none
  registered yet, restricted to the rewards in ``config.reward_fn``), ``prior`` (group -> weight;
  default uniform), ``gamma`` (0.5), ``temperature`` (0.2), ``ranges`` (reward -> (lo, hi); default
  (0, 1)), ``judge`` ("rule").
- ``config.aesthetic``: ``clip_path`` (CLIP ViT-L/14 folder), ``head_path`` (LAION aesthetic MLP
  ``.pth``), ``num_frames`` (4).
- ``config.naturalness``: ``model_path`` (Qwen2.5-VL folder), ``prompt``, ``num_frames`` (4).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from identity_grpo.advantages import AdvantageStats, weighted_group_advantages
from identity_grpo.rewards import CombinedReward, RewardInputs, config_field, register

MODES = ("sum", "idcrafter", "evoid")
LEVELS = ("reward", "advantage")
DEFAULT_GROUPS = {
    "identity": ("facesim", "identity", "ref_similarity", "ref_tone"),
    "text": (),
    "quality": ("aesthetic", "naturalness"),
}


# ------------------------------------------------------------------ pure combination math


def face_fidelity(mean: torch.Tensor, minimum: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """ID-Crafter's ``R_face = (1 - gamma) * mean_k(id_k) + gamma * min_k(id_k)``, all ``(B,)``."""
    return (1.0 - gamma) * mean + gamma * minimum


def shares(weights: Mapping[str, float], keys) -> dict[str, float]:
    """``weights[k] / sum_j weights[j]`` over ``keys``: a group's within-group shares."""
    total = sum(float(weights[key]) for key in keys)
    if total <= 0:
        raise ValueError(f"the weights of {list(keys)} in config.reward_fn must sum to > 0, got {total}")
    return {key: float(weights[key]) / total for key in keys}


def idcrafter_key_weights(
    quality_shares: Mapping[str, float], *, face_key: str = "facesim", gamma: float = 0.5, w_fid: float = 0.6,
    w_qual: float = 0.4,
) -> dict[str, float]:
    """ID-Crafter's reward as linear weights over reward keys:
    ``{face: w_fid (1 - gamma), face/min: w_fid gamma, q: w_qual share_q}``."""
    weights = {face_key: w_fid * (1.0 - gamma), f"{face_key}/min": w_fid * gamma}
    weights.update({key: w_qual * share for key, share in quality_shares.items()})
    return weights


def normalise_score(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clip((values - low) / (high - low), 0, 1)``, float64, any shape."""
    if not high > low:
        raise ValueError(f"a reward range needs high > low, got ({low}, {high})")
    return ((values.double() - low) / (high - low)).clamp(0.0, 1.0)


def rule_batch_weights(group_scores: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """EvoID's rule judge: ``softmax(-mean_batch(G) / temperature)``.

    Args:
        group_scores: ``(N, G)`` normalised group scores in [0, 1] of the N samples of the batch.
        temperature: > 0; smaller gives more of the weight to the weakest group.

    Returns:
        ``(G,)`` float64 weights summing to 1, largest for the group with the lowest mean.
    """
    if temperature <= 0:
        raise ValueError(f"evoid temperature must be > 0, got {temperature}")
    return torch.softmax(-group_scores.double().mean(dim=0) / temperature, dim=0)


def blend_weights(prior: torch.Tensor, batch: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """``(1 - gamma) * p_prior + gamma * p_batch`` over ``(G,)`` groups (the prior normalised to sum 1)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"evoid gamma must be in [0, 1], got {gamma}")
    prior = prior.double()
    if bool((prior < 0).any()) or float(prior.sum()) <= 0:
        raise ValueError(f"evoid prior weights must be >= 0 and not all 0, got {prior.tolist()}")
    return (1.0 - gamma) * prior / prior.sum() + gamma * batch.double()


# A judge maps (group names, (N, G) normalised group scores) to (G,) batch weights summing to 1.
BatchJudge = Callable[[list[str], torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------ config resolution


def combination_mode(config) -> str:
    """``config.reward_combination.mode`` ("sum" when absent), validated."""
    mode = config_field(config_field(config, "reward_combination", None), "mode", "sum")
    if mode not in MODES:
        raise ValueError(f"config.reward_combination.mode must be one of {MODES}, got {mode!r}")
    return mode


@dataclass
class Combination:
    """A resolved combination: how to turn reward keys into one reward or one advantage.

    ``key_weights`` are linear weights over (for EvoID, normalised) reward keys; for EvoID they
    are recomputed from each batch by :meth:`weights_for`.
    """

    mode: str
    level: str
    key_weights: dict[str, float]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # EvoID: group -> {key: share}
    prior: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    gamma: float = 0.5
    temperature: float = 0.2
    judge: BatchJudge | None = None

    @classmethod
    def from_config(cls, config) -> Combination:
        options = config_field(config, "reward_combination", None)
        mode = combination_mode(config)
        level = config_field(options, "level", "reward")
        if level not in LEVELS:
            raise ValueError(f"config.reward_combination.level must be one of {LEVELS}, got {level!r}")
        weights = dict(config_field(config, "reward_fn", {}))
        if mode == "sum":
            return cls(mode, level, {key: float(w) for key, w in weights.items()})
        if mode == "idcrafter":
            section = config_field(options, "idcrafter", None)
            face_key = config_field(section, "face_key", "facesim")
            quality_keys = list(config_field(section, "quality_keys", ("aesthetic", "naturalness")))
            missing = [key for key in (face_key, *quality_keys) if key not in weights]
            if missing:
                raise ValueError(f"reward_combination.mode 'idcrafter' needs the rewards {missing} in config.reward_fn "
                                 f"(has {sorted(weights)}); their weights there set the shares within quality")
            key_weights = idcrafter_key_weights(
                shares(weights, quality_keys), face_key=face_key,
                gamma=float(config_field(section, "gamma", 0.5)), w_fid=float(config_field(section, "w_fid", 0.6)),
                w_qual=float(config_field(section, "w_qual", 0.4)),
            )
            return cls(mode, level, key_weights)
        section = config_field(options, "evoid", None)
        configured = config_field(section, "groups", None)
        groups_spec = {g: list(keys) for g, keys in (configured or DEFAULT_GROUPS).items()}
        if configured is None:  # default groups: keep the rewards that are configured
            groups_spec = {g: [k for k in keys if k in weights] for g, keys in groups_spec.items()}
            groups_spec = {g: keys for g, keys in groups_spec.items() if keys}
            unassigned = sorted(set(weights) - {k for keys in groups_spec.values() for k in keys})
            if unassigned:
                raise ValueError(f"rewards {unassigned} are in no evoid group; set "
                                 "config.reward_combination.evoid.groups (group -> reward names)")
        missing = sorted({k for keys in groups_spec.values() for k in keys} - set(weights))
        if missing or not groups_spec:
            raise ValueError(f"evoid groups {groups_spec} name rewards not in config.reward_fn: {missing}")
        groups = {g: shares(weights, keys) for g, keys in groups_spec.items()}
        prior = dict(config_field(section, "prior", None) or {g: 1.0 for g in groups})
        if set(prior) != set(groups):
            raise ValueError(f"config.reward_combination.evoid.prior has groups {sorted(prior)}, expected {sorted(groups)}")
        ranges = {k: tuple(float(v) for v in r) for k, r in dict(config_field(section, "ranges", {}) or {}).items()}
        judge_name = config_field(section, "judge", "rule")
        temperature = float(config_field(section, "temperature", 0.2))
        if judge_name != "rule":
            raise ValueError(f"config.reward_combination.evoid.judge {judge_name!r} is not available; only 'rule' is "
                             "built in (a VLM judge can be passed as Combination(judge=fn))")
        combination = cls(mode, level, {}, groups=groups, prior={g: float(prior[g]) for g in groups}, ranges=ranges,
                          gamma=float(config_field(section, "gamma", 0.5)), temperature=temperature)
        combination.judge = lambda names, scores: rule_batch_weights(scores, combination.temperature)
        return combination

    def prepare(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reward keys this combination weights, EvoID's normalised to [0, 1]."""
        keys = [k for members in self.groups.values() for k in members] if self.mode == "evoid" else list(self.key_weights)
        missing = sorted(set(keys) - set(scores))
        if missing:
            raise KeyError(f"reward combination {self.mode!r} needs reward keys {missing}; got {sorted(scores)}")
        if self.mode != "evoid":
            return {k: scores[k].double() for k in keys}
        return {k: normalise_score(scores[k], *self.ranges.get(k, (0.0, 1.0))) for k in keys}

    def weights_for(self, prepared: Mapping[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
        """``(key_weights, group_weights)`` for this batch (fixed unless EvoID)."""
        if self.mode != "evoid":
            return dict(self.key_weights), {}
        names = list(self.groups)
        group_scores = torch.stack(
            [sum(share * prepared[k] for k, share in self.groups[g].items()) for g in names], dim=1
        )  # (N, G)
        batch = self.judge(names, group_scores)
        blended = blend_weights(torch.tensor([self.prior[g] for g in names]), batch, self.gamma)
        group_weights = dict(zip(names, blended.tolist()))
        key_weights = {k: group_weights[g] * share for g in names for k, share in self.groups[g].items()}
        return key_weights, group_weights


# ------------------------------------------------------------------ reward-level object and epoch advantages


class CompositeReward:
    """A :class:`CombinedReward` whose ``total`` is the configured composite (same call and return).

    Extra keys: ``composite/face`` and ``composite/quality`` (ID-Crafter), ``composite/weight/<group>``
    and ``composite/<group>`` (EvoID: the blended weight and the normalised group score).
    """

    def __init__(self, combined: CombinedReward, config):
        self.combined = combined
        self.combination = Combination.from_config(config)
        self.options = config_field(config_field(config, "reward_combination", None), "idcrafter", None)

    def to(self, device: torch.device | str) -> CompositeReward:
        """See :meth:`CombinedReward.to`."""
        self.combined.to(device)
        return self

    def __call__(self, inputs: RewardInputs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        scores, seconds = self.combined(inputs)
        prepared = self.combination.prepare(scores)
        key_weights, group_weights = self.combination.weights_for(prepared)
        scores["total"] = sum(w * prepared[k] for k, w in key_weights.items()).float()
        batch = scores["total"].shape[0]
        if self.combination.mode == "idcrafter":
            face_key = config_field(self.options, "face_key", "facesim")
            gamma = float(config_field(self.options, "gamma", 0.5))
            scores["composite/face"] = face_fidelity(scores[face_key], scores[f"{face_key}/min"], gamma)
            quality = {k: w for k, w in key_weights.items() if k not in (face_key, f"{face_key}/min")}
            share_sum = sum(quality.values())
            scores["composite/quality"] = sum(w / share_sum * scores[k] for k, w in quality.items())
        for group, weight in group_weights.items():
            scores[f"composite/weight/{group}"] = torch.full((batch,), weight)
            scores[f"composite/{group}"] = sum(s * prepared[k] for k, s in self.combination.groups[group].items()).float()
        return scores, seconds


@dataclass
class EpochAdvantages:
    """What :func:`epoch_advantages` returns: ``advantages`` ``(N,)`` float32, the normalisation
    ``stats``, and ``metrics`` to log (``reward/weight/<key or group>``)."""

    advantages: torch.Tensor
    stats: AdvantageStats
    metrics: dict[str, float]


def epoch_advantages(
    scores: Mapping[str, torch.Tensor], group_ids: torch.Tensor, config, *, global_std: bool = False,
    clip_max: float = 5.0,
) -> EpochAdvantages:
    """Advantages of an epoch's gathered rewards under ``config.reward_combination``.

    Args:
        scores: reward key -> ``(N,)`` gathered over all ranks (at least the keys the combination
            weights: the rewards of ``config.reward_fn``, plus ``<face_key>/min`` for ID-Crafter).
        group_ids: ``(N,)`` GRPO group ids.
        global_std, clip_max: as in :func:`identity_grpo.advantages.group_advantages`.

    With mode "sum" and level "reward" this is ``group_advantages(sum_k w_k r_k)``, i.e. what the
    train loop did before composites existed.
    """
    combination = Combination.from_config(config)
    prepared = combination.prepare({k: v.cpu() for k, v in scores.items()})
    key_weights, group_weights = combination.weights_for(prepared)
    advantages, stats = weighted_group_advantages(
        prepared, group_ids.cpu(), key_weights, level=combination.level, global_std=global_std, clip_max=clip_max
    )
    metrics = {f"reward/weight/{k}": w for k, w in key_weights.items()}
    metrics.update({f"reward/weight/group/{g}": w for g, w in group_weights.items()})
    return EpochAdvantages(advantages, stats, metrics)


# ------------------------------------------------------------------ quality rewards


def _local_folder(section, section_name: str, name: str, what: str) -> str:
    path = str(config_field(section, name, ""))
    if not path:
        raise ValueError(f"config.{section_name}.{name} is empty; set it to a local {what} (never downloaded at run time)")
    if not Path(path).exists():
        raise FileNotFoundError(f"config.{section_name}.{name} = {path!r} does not exist; point it at a local {what}")
    return path


def _sample_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(B, n, H, W, 3)``: ``num_frames`` frames at ``round(linspace(0, F - 1, n))``."""
    from identity_grpo.rewards.facesim import frame_indices

    return frames[:, frame_indices(frames.shape[1], num_frames)]


class AestheticHead(torch.nn.Module):
    """LAION's improved aesthetic predictor MLP (``sac+logos+ava1-l14-linearMSE.pth``): CLIP
    image embedding (normalised) -> score, about 1-10."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


@register("aesthetic")
def aesthetic(config, device: torch.device):
    """LAION aesthetic score / 10 (about [0.1, 1]), averaged over ``config.aesthetic.num_frames`` frames."""
    section = config_field(config, "aesthetic", None)
    clip_path = _local_folder(section, "aesthetic", "clip_path", "CLIP ViT-L/14 folder (openai/clip-vit-large-patch14)")
    head_path = _local_folder(section, "aesthetic", "head_path", "LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth)")
    num_frames = int(config_field(section, "num_frames", 4))
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_path, local_files_only=True).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_path, local_files_only=True)
    head = AestheticHead(model.config.projection_dim)
    head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    head = head.to(device).eval()
    lock = threading.Lock()

    @torch.no_grad()
    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        frames = _sample_frames(inputs.frames, num_frames)  # (B, n, H, W, 3)
        b, n = frames.shape[:2]
        with lock:
            pixels = processor(images=list(frames.reshape(b * n, *frames.shape[2:]).numpy()), return_tensors="pt")
            embeddings = model.get_image_features(pixel_values=pixels["pixel_values"].to(device))
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
            scores = head(embeddings).reshape(b, n).mean(dim=1) / 10.0
        return {"aesthetic": scores.cpu()}

    return fn


DEFAULT_NATURALNESS_PROMPT = (
    "These are frames of a generated video. Do the people look natural (plausible anatomy, faces, "
    "motion and lighting, no artifacts)? Answer Yes or No."
)


@register("naturalness")
def naturalness(config, device: torch.device):
    """A VLM judge (Qwen2.5-VL): ``P(Yes) / (P(Yes) + P(No))`` for the first answer token, given
    ``config.naturalness.num_frames`` frames as images and ``config.naturalness.prompt``."""
    section = config_field(config, "naturalness", None)
    model_path = _local_folder(section, "naturalness", "model_path", "Qwen2.5-VL-Instruct folder")
    prompt = str(config_field(section, "prompt", DEFAULT_NATURALNESS_PROMPT))
    num_frames = int(config_field(section, "num_frames", 4))
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True, torch_dtype="auto")
    model = model.to(device).eval()
    answer_ids = [processor.tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]
    lock = threading.Lock()

    @torch.no_grad()
    def fn(inputs: RewardInputs) -> dict[str, torch.Tensor]:
        frames = _sample_frames(inputs.frames, num_frames).numpy()
        scores = []
        with lock:
            for clip in frames:
                content = [{"type": "image"} for _ in clip] + [{"type": "text", "text": prompt}]
                text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
                batch = processor(text=[text], images=[Image.fromarray(f) for f in clip], return_tensors="pt").to(device)
                logits = model(**batch).logits[0, -1, answer_ids].float()
                scores.append(torch.softmax(logits, dim=0)[0].cpu())
        return {"naturalness": torch.stack(scores)}

    return fn
