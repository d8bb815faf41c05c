"""EvoID's anchors (CVPR 2026, "Reinforced Evolution for Identity-Preserving Video Generation"),
as pure functions of tensors; its policy loss is DiffusionNFT's (:mod:`identity_grpo.nft`):
EvoID's ``v+ = v_stb + beta Delta``, ``v- = v_stb - beta Delta`` with ``Delta = v_evo - v_stb`` is
NFT's form with the Stable (old-policy) velocity as ``v_old``.

- T2V anchor, ``lambda_t2v * mean((v_evo - v_t2v)^2)`` on the VIDEO latent frames only: keeps the
  Evolving model's motion and prompt following close to a frozen text-to-video teacher.
- Self anchor, ``lambda_self * mean((v_evo - v_init)^2)``: to the initial model (adapter off).

Means run over every element of every sample (then the batch), as the NFT terms do.
"""

from __future__ import annotations

import torch


def anchor_losses(
    v_evo: torch.Tensor,
    v_t2v: torch.Tensor,
    v_init: torch.Tensor,
    *,
    video_frames: slice,
    lambda_t2v: float,
    lambda_self: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weighted sum, stats)`` of the two anchors.

    Args:
        v_evo: ``(B, C, T, h, w)`` the trained (Evolving) velocity, with gradients.
        v_t2v: ``(B, C, F, h, w)`` the teacher's velocity on the video frames (detached here).
        v_init: ``(B, C, T, h, w)`` the initial model's velocity (detached here).
        video_frames: which of ``v_evo``'s latent frames are video frames (VACE: after the
            reference slots; Phantom: all of its state).
    """
    v_evo = v_evo.float()
    t2v = ((v_evo[:, :, video_frames] - v_t2v.float().detach()) ** 2).mean()
    self_anchor = ((v_evo - v_init.float().detach()) ** 2).mean()
    loss = lambda_t2v * t2v + lambda_self * self_anchor
    return loss, {"t2v_anchor": t2v.detach(), "self_anchor": self_anchor.detach()}
