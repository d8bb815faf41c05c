"""Pairwise preference losses and accuracy for reward-model training; pure functions of tensors.

Notation: ``d = r_A - r_B`` is the score difference of a pair, ``target`` is P(A preferred):
1 for "A", 0 for "B", 0.5 for "tie". All functions upcast to float32 and return the mean over
the pairs (a scalar), so the loss does not depend on the batch size.

Bradley-Terry (BT): ``P(A > B) = sigmoid(d)``. It has no tie outcome. ``bt`` follows VideoAlign
(``trainer.py``, ``loss_type == "bt"``): tied pairs get zero loss but still count in the mean over
pairs. ``bt_soft`` instead trains a tie as the soft label 0.5, whose loss
``-(log sigmoid(d) + log sigmoid(-d)) / 2`` is smallest at ``d = 0``.

Bradley-Terry with ties (BTT, Rao & Kupper 1967): with a tie parameter ``theta > 1``,

    P(A > B) = sigmoid(d - log theta)
    P(B > A) = sigmoid(-d - log theta)
    P(tie)   = 1 - P(A > B) - P(B > A) = (theta^2 - 1) * P(A > B) * P(B > A)

so ties are a third outcome whose probability peaks at ``d = 0``; ``theta -> 1`` recovers BT
without ties. The loss is the negative log-likelihood of the labelled outcome.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIE = 0.5


def bradley_terry_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """VideoAlign's BT loss: ``-log sigmoid(r_preferred - r_other)`` on decisive pairs, 0 on ties,
    summed and divided by the number of ALL pairs (ties included), as VideoAlign's masked mean.

    Args:
        reward_a, reward_b: ``(P,)`` scores of the two videos of each pair.
        target: ``(P,)`` 1 (A preferred), 0 (B preferred) or 0.5 (tie).
    """
    outcome = _outcome_index(target)
    d = reward_a.float() - reward_b.float()
    preferred_margin = torch.where(outcome == 0, d, -d)
    return (-F.logsigmoid(preferred_margin) * (outcome != 2)).mean()


def soft_bradley_terry_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BT cross-entropy ``-[t log sigmoid(d) + (1 - t) log sigmoid(-d)]``, mean over pairs.

    Args:
        reward_a, reward_b: ``(P,)`` scores of the two videos of each pair.
        target: ``(P,)`` P(A preferred) in [0, 1] (ties are 0.5).
    """
    d = reward_a.float() - reward_b.float()
    target = target.float()
    return -(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d)).mean()


def outcome_log_probs(reward_a: torch.Tensor, reward_b: torch.Tensor, theta: float) -> torch.Tensor:
    """Rao-Kupper log-probabilities ``(P, 3)`` of the outcomes (A wins, B wins, tie).

    ``theta == 1`` gives BT (the tie column is ``-inf``).
    """
    if theta < 1:
        raise ValueError(f"tie parameter theta must be >= 1, got {theta}")
    d = reward_a.float() - reward_b.float()
    log_theta = math.log(theta)
    log_a = F.logsigmoid(d - log_theta)
    log_b = F.logsigmoid(-d - log_theta)
    # log P(tie) = log(theta^2 - 1) + log P(A) + log P(B), stable for any d.
    log_tie = (math.log(theta**2 - 1) if theta > 1 else -math.inf) + log_a + log_b
    return torch.stack([log_a, log_b, log_tie], dim=-1)


def _outcome_index(target: torch.Tensor) -> torch.Tensor:
    """0 for A (target 1), 1 for B (target 0), 2 for a tie (target 0.5)."""
    target = target.float()
    if not bool(((target == 1) | (target == 0) | (target == TIE)).all()):
        raise ValueError("targets must be 1 (A), 0 (B) or 0.5 (tie)")
    return torch.where(target == TIE, 2, torch.where(target == 1, 0, 1))


def bradley_terry_ties_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, target: torch.Tensor,
                            theta: float = 5.0) -> torch.Tensor:
    """BTT negative log-likelihood of the labelled outcome, mean over pairs.

    Args:
        reward_a, reward_b: ``(P,)`` scores.
        target: ``(P,)`` 1 (A), 0 (B) or 0.5 (tie).
        theta: Rao-Kupper tie parameter (> 1). Larger values reserve a wider band of ``d`` around 0
            for ties.
    """
    if theta <= 1:
        raise ValueError(f"the ties loss needs theta > 1, got {theta}; use the BT loss for theta = 1")
    log_probs = outcome_log_probs(reward_a, reward_b, theta)
    return -log_probs.gather(-1, _outcome_index(target)[:, None]).mean()


PREFERENCE_LOSSES = ("bt", "bt_soft", "btt")


def preference_loss(name: str, reward_a, reward_b, target, theta: float = 5.0) -> torch.Tensor:
    """``"bt"`` (VideoAlign: ties masked), ``"bt_soft"`` (ties as 0.5) or ``"btt"``."""
    if name == "bt":
        return bradley_terry_loss(reward_a, reward_b, target)
    if name == "bt_soft":
        return soft_bradley_terry_loss(reward_a, reward_b, target)
    if name == "btt":
        return bradley_terry_ties_loss(reward_a, reward_b, target, theta)
    raise ValueError(f"unknown loss {name!r}; use one of {PREFERENCE_LOSSES}")


def pairwise_accuracy(reward_a: torch.Tensor, reward_b: torch.Tensor, target: torch.Tensor,
                      theta: float = 1.0) -> dict[str, float]:
    """Accuracy of the predicted outcome, ties included, and over decisive pairs only.

    The prediction is the most likely Rao-Kupper outcome under ``theta``: a tie is predicted when
    ``P(tie)`` exceeds both ``P(A > B)`` and ``P(B > A)`` (never for ``theta == 1``). So a
    labelled tie counts as correct only when the model predicts a tie, and a decisive pair only
    when the model prefers the labelled video and does not predict a tie.

    Returns:
        ``accuracy`` (all pairs), ``accuracy_decisive`` (pairs labelled A or B; NaN if none),
        ``num_pairs``, ``num_ties``.
    """
    outcome = _outcome_index(target)
    predicted = outcome_log_probs(reward_a, reward_b, theta).argmax(dim=-1)
    correct = (predicted == outcome).float()
    decisive = outcome != 2
    return {
        "accuracy": correct.mean().item(),
        "accuracy_decisive": correct[decisive].mean().item() if bool(decisive.any()) else float("nan"),
        "num_pairs": int(outcome.numel()),
        "num_ties": int((~decisive).sum()),
    }
