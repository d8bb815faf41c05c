"""The old (sampling) policy of the forward-process objectives: a second, frozen LoRA adapter.

DiffusionNFT keeps the policy that collects data as a separate peft adapter named "old" on the
same base model, updated after every epoch as an EMA of the trained adapter
(``old = decay * old + (1 - decay) * trained``, :func:`identity_grpo.nft.old_policy_decay`). The
same adapter is EvoID's "Stable" transformer. It starts as a copy of the trained adapter.

peft's ``set_adapter`` also sets ``requires_grad`` (True for the active adapter only), so
:func:`active_adapter` switches back to the trained adapter on exit, which restores it: the old
adapter's weights never train and never enter the optimizer.

Under FSDP2 both adapters are sharded alike (DTensors with the same placements), so the EMA
update is elementwise on each rank's shards; checkpoint state is gathered whole and cut back on load.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

TRAINED = "default"
OLD = "old"


def adapter_parameters(peft_model, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of ``adapter``, in module order (the same order for every adapter)."""
    marker = f".{adapter}."
    return [p for name, p in peft_model.named_parameters() if marker in f"{name}." and "lora_" in name]


def add_old_policy(peft_model) -> None:
    """Add the frozen "old" adapter as an exact copy of the trained one (before ``accelerator.prepare``)."""
    if OLD in peft_model.peft_config:
        raise ValueError("the peft model already has an 'old' adapter")
    peft_model.add_adapter(OLD, peft_model.peft_config[TRAINED])
    peft_model.set_adapter(TRAINED)  # keeps the old adapter frozen (set_adapter sets requires_grad)
    trained, old = adapter_parameters(peft_model, TRAINED), adapter_parameters(peft_model, OLD)
    if len(trained) != len(old) or not trained:
        raise RuntimeError(f"the trained and old adapters differ in layout ({len(trained)} vs {len(old)} tensors)")
    with torch.no_grad():
        for target, source in zip(old, trained):
            target.data = source.detach().clone()
    for parameter in old:
        parameter.requires_grad_(False)


@contextmanager
def active_adapter(peft_model, adapter: str):
    """Run the model with ``adapter`` active, then with the trained one again."""
    peft_model.set_adapter(adapter)
    try:
        yield
    finally:
        peft_model.set_adapter(TRAINED)


@torch.no_grad()
def update_old_policy(peft_model, decay: float) -> None:
    """``old = decay * old + (1 - decay) * trained``, elementwise over every LoRA tensor."""
    for old, trained in zip(adapter_parameters(peft_model, OLD), adapter_parameters(peft_model, TRAINED), strict=True):
        old.mul_(decay).add_(trained.detach().to(old.dtype), alpha=1.0 - decay)


def named_adapter_parameters(peft_model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """``adapter``'s LoRA parameters keyed as peft's saved state dict keys them (adapter name removed)."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): p for name, p in peft_model.named_parameters()
            if marker in f"{name}." and "lora_" in name}


def old_policy_state(peft_model) -> dict[str, torch.Tensor]:
    """The old adapter's tensors whole (for checkpoints), keyed like the trained adapter's
    ``adapter_model.safetensors`` (collective under FSDP2: call it on every rank)."""
    from identity_grpo.checkpoint import full_tensor

    return {name: full_tensor(p.detach()).cpu().clone() for name, p in named_adapter_parameters(peft_model, OLD).items()}


@torch.no_grad()
def load_old_policy_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    from identity_grpo.checkpoint import shard_like

    parameters = named_adapter_parameters(peft_model, OLD)
    if state.keys() != parameters.keys():
        missing, unexpected = sorted(parameters.keys() - state.keys()), sorted(state.keys() - parameters.keys())
        raise ValueError(f"old-policy state does not fit the model's old adapter (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the config the run was started with")
    for name, parameter in parameters.items():
        parameter.copy_(shard_like(state[name].to(parameter.dtype), parameter))
