"""When and how strongly the EMA of the LoRA weights is updated (``train.ema_*``).

The average itself is diffusers' ``EMAModel``; this module only decides its schedule. Its decay
after optimizer step ``n`` is ``min((1 + n) / (10 + n), train.ema_decay)``: ``EMAModel``'s
warm-up, indexed by the optimizer step as upstream's ``EMAModuleWrapper.get_current_decay`` is.

Upstream Identity-GRPO calls its EMA after every sampling batch it trains on, with the current
optimizer step count ``n``, and applies it when ``(n + 1) % 8 == 0``. The weights change only at
optimizer steps, so the calls that share one ``n`` (one per sampling batch of the gradient
accumulation group) are identical updates of the same weights: ``repeats`` of them.
"""

from __future__ import annotations


def ema_repeats(train_config) -> int:
    """How many identical updates one qualifying optimizer step makes (see the module docstring)."""
    return train_config.gradient_accumulation_steps if train_config.ema_per_sampling_batch else 1


def ema_update(ema, parameters, optimizer_step: int, *, interval: int, repeats: int = 1) -> bool:
    """Update ``ema`` (a diffusers ``EMAModel``) after optimizer step ``optimizer_step`` (1-based:
    the number of steps taken so far) if the schedule says so; returns whether it did."""
    if (optimizer_step + 1) % interval:
        return False
    for _ in range(repeats):
        # EMAModel.step increments its counter and takes the decay of (counter - 1): setting it to
        # the optimizer step first makes that min((1 + n) / (10 + n), decay) for n = optimizer_step.
        ema.optimization_step = optimizer_step
        ema.step(parameters)
    return True
