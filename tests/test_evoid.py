"""EvoID's anchors by hand, and the T2V teacher: Wan2.1-VACE with its context switched off is
exactly the Wan2.1 text-to-video transformer with the same base weights."""

import pytest
import torch

from identity_grpo.evoid import anchor_losses


def test_anchor_losses_by_hand():
    # (B, C, T, h, w) = (1, 1, 3, 1, 1): one reference slot (frame 0), two video frames.
    v_evo = torch.tensor([0.5, 1.0, -1.0]).view(1, 1, 3, 1, 1).requires_grad_(True)
    v_t2v = torch.tensor([0.0, -1.0]).view(1, 1, 2, 1, 1)   # on the video frames only
    v_init = torch.tensor([0.5, 0.0, 0.0]).view(1, 1, 3, 1, 1)
    loss, stats = anchor_losses(v_evo, v_t2v, v_init, video_frames=slice(1, None), lambda_t2v=0.01, lambda_self=0.2)
    # t2v: mean((1 - 0)^2, (-1 + 1)^2) = 0.5; self: mean(0, 1, 1) = 2/3; loss = 0.005 + 0.1333
    assert stats["t2v_anchor"].item() == pytest.approx(0.5)
    assert stats["self_anchor"].item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(0.01 * 0.5 + 0.2 * 2 / 3, abs=1e-7)
    loss.backward()
    # d/dv_evo: t2v on video frames 0.01 * 2 (v - t) / 2, self 0.2 * 2 (v - i) / 3
    expected = torch.tensor([0.0, 0.01 * 1.0 + 0.4 / 3, 0.0 + 0.4 / 3 * -1.0]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(v_evo.grad, expected, rtol=1e-5, atol=1e-7)


def test_vace_with_its_context_off_is_the_t2v_transformer():
    from diffusers import WanTransformer3DModel

    from identity_grpo.testing import build_vace_transformer

    vace = build_vace_transformer()
    fields = ["patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len"]
    t2v = WanTransformer3DModel(**{k: vace.config[k] for k in fields}).eval()
    base_weights = {k: v for k, v in vace.state_dict().items() if not k.startswith("vace_")}
    t2v.load_state_dict(base_weights, strict=True)  # raises unless the parameters are exactly the same
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 2, 4, 4, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    control = torch.randn(2, 72, 2, 4, 4, generator=generator)
    timestep = torch.tensor([500, 200])
    with torch.no_grad():
        off = vace(hidden_states=video, timestep=timestep, encoder_hidden_states=text, control_hidden_states=control,
                   control_hidden_states_scale=torch.zeros(2), return_dict=False)[0]
        on = vace(hidden_states=video, timestep=timestep, encoder_hidden_states=text, control_hidden_states=control,
                  control_hidden_states_scale=torch.ones(2), return_dict=False)[0]
        plain = t2v(hidden_states=video, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(off, plain)
    assert not torch.allclose(on, plain)
