"""The old-policy adapter of the forward-process objectives: a frozen copy, switched in and out,
updated as an EMA, saved and restored."""

import torch

from config.dgx import tiny
from identity_grpo.models import add_lora
from identity_grpo.old_policy import (
    OLD,
    TRAINED,
    active_adapter,
    adapter_parameters,
    add_old_policy,
    load_old_policy_state,
    old_policy_state,
    update_old_policy,
)
from identity_grpo.testing import build_vace_transformer, randomize_lora_b


def _model():
    model = add_lora(build_vace_transformer(), tiny())
    randomize_lora_b(model, std=0.05, seed=0)  # a trained-looking adapter, so adapters differ in output
    add_old_policy(model)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 4, 3, 4, 4, generator=generator)
    control = torch.randn(1, 2 * 4 + 64, 3, 4, 4, generator=generator)
    text = torch.randn(1, 16, 32, generator=generator)
    return dict(hidden_states=hidden, timestep=torch.tensor([500]), encoder_hidden_states=text,
                control_hidden_states=control, return_dict=False)


def test_old_adapter_is_a_frozen_copy():
    model = _model()
    trained, old = adapter_parameters(model, TRAINED), adapter_parameters(model, OLD)
    assert len(trained) == len(old) > 0
    assert all(torch.equal(a, b) for a, b in zip(trained, old))
    assert all(p.requires_grad for p in trained) and not any(p.requires_grad for p in old)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in trained}  # the optimizer sees the trained adapter only
    with torch.no_grad():
        out_trained = model(**_inputs())[0]
        with active_adapter(model, OLD):
            out_old = model(**_inputs())[0]
    assert torch.equal(out_trained, out_old)


def test_switching_restores_the_trained_adapter_and_its_gradients():
    model = _model()
    with torch.no_grad():
        for p in adapter_parameters(model, TRAINED):
            p.add_(0.01)  # one "update" of the trained adapter
        out_trained = model(**_inputs())[0]
        with active_adapter(model, OLD):
            assert not any(p.requires_grad for p in adapter_parameters(model, TRAINED))
            out_old = model(**_inputs())[0]
        assert torch.equal(model(**_inputs())[0], out_trained)
    assert not torch.equal(out_old, out_trained)
    assert all(p.requires_grad for p in adapter_parameters(model, TRAINED))
    assert not any(p.requires_grad for p in adapter_parameters(model, OLD))


def test_update_is_an_ema_and_state_round_trips():
    model = _model()
    with torch.no_grad():
        for p in adapter_parameters(model, TRAINED):
            p.add_(1.0)
    before = [p.clone() for p in adapter_parameters(model, OLD)]
    update_old_policy(model, decay=0.25)  # old = 0.25 old + 0.75 (old + 1) = old + 0.75
    for now, then in zip(adapter_parameters(model, OLD), before):
        torch.testing.assert_close(now, then + 0.75, rtol=0, atol=1e-6)
    state = old_policy_state(model)
    update_old_policy(model, decay=0.0)
    load_old_policy_state(model, state)
    restored = old_policy_state(model)
    assert all(torch.equal(restored[name], state[name]) for name in state)
    # Keyed as peft saves the trained adapter, so the two checkpoint files line up.
    from peft.utils import get_peft_model_state_dict

    assert state.keys() == get_peft_model_state_dict(model).keys()
