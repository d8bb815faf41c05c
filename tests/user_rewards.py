"""A reward the project does not ship, written as a user would write one (README, "Rewards"):
a factory registered from a file of one's own. tests/test_world_learns.py trains it on the tiny
world through ``--config.reward_modules=tests/user_rewards.py`` and the ``tiny_world_reward``
preset. Not collected by pytest (no ``test_`` prefix)."""

from identity_grpo.rewards import register


@register("contrast")
def contrast(config, device):
    """The standard deviation of each frame's grey levels (in [0, 1]), averaged over frames."""

    def fn(inputs):
        grey = inputs.frames.float().mean(dim=-1) / 255.0  # (B, F, H, W)
        return {"contrast": grey.flatten(2).std(dim=-1).mean(dim=1)}

    return fn
