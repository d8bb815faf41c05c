"""The reward registry, weighting in CombinedReward, NaN checks, and the pixel ref_similarity reward."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from identity_grpo.rewards import REGISTRY, CombinedReward, RewardInputs, build_reward_fn, register
from identity_grpo.rewards.pixel import ref_similarity

NAME_A = "_test_registry_const_a"
NAME_B = "_test_registry_const_b"
NAME_NAN = "_test_registry_nan"


@pytest.fixture
def fake_rewards():
    """Three test-only rewards, removed from the global registry afterwards."""

    @register(NAME_A)
    def const_a(config, device):
        return lambda inputs: {NAME_A: torch.tensor([1.0, 2.0]), f"{NAME_A}/sub": torch.tensor([10.0, 20.0])}

    @register(NAME_B)
    def const_b(config, device):
        return lambda inputs: {NAME_B: torch.tensor([3.0, -1.0], dtype=torch.float64)}

    @register(NAME_NAN)
    def nan_reward(config, device):
        return lambda inputs: {NAME_NAN: torch.tensor([0.5, float("nan")])}

    yield
    for name in (NAME_A, NAME_B, NAME_NAN):
        REGISTRY.pop(name, None)


def _inputs(frames):
    batch = frames.shape[0]
    references = [[Image.new("RGB", (8, 8))] for _ in range(batch)]
    return RewardInputs(frames, references, [f"prompt {i}" for i in range(batch)])


BLANK = torch.zeros(2, 1, 8, 8, 3, dtype=torch.uint8)


def test_combined_reward_weights_by_hand(fake_rewards):
    reward_fn = build_reward_fn(SimpleNamespace(reward_fn={NAME_A: 0.5, NAME_B: 2.0}), torch.device("cpu"))
    scores, seconds = reward_fn(_inputs(BLANK))
    # 0.5 * [1, 2] + 2.0 * [3, -1] = [6.5, -1.0]; the sub-score is logged, not weighted.
    assert scores["total"].tolist() == [6.5, -1.0]
    assert scores[NAME_A].tolist() == [1.0, 2.0]
    assert scores[f"{NAME_A}/sub"].tolist() == [10.0, 20.0]
    assert scores[NAME_B].dtype == torch.float32
    assert set(seconds) == {NAME_A, NAME_B}


def test_nan_reward_raises_naming_the_reward_and_sample(fake_rewards):
    reward_fn = build_reward_fn(SimpleNamespace(reward_fn={NAME_A: 1.0, NAME_NAN: 1.0}), torch.device("cpu"))
    with pytest.raises(FloatingPointError) as error:
        reward_fn(_inputs(BLANK))
    assert NAME_NAN in str(error.value)
    assert "[1]" in str(error.value)
    assert "prompt 1" in str(error.value)


def test_unknown_reward_names_list_the_registered_ones(fake_rewards):
    with pytest.raises(ValueError) as error:
        build_reward_fn(SimpleNamespace(reward_fn={"no_such_reward": 1.0, NAME_A: 1.0}), torch.device("cpu"))
    message = str(error.value)
    assert "no_such_reward" in message
    assert "ref_similarity" in message and NAME_A in message and NAME_B in message


def test_empty_reward_config_raises():
    with pytest.raises(ValueError, match="reward_fn is empty"):
        build_reward_fn(SimpleNamespace(reward_fn={}), torch.device("cpu"))


def test_registering_a_name_twice_raises(fake_rewards):
    with pytest.raises(ValueError, match="twice"):
        register(NAME_A)(lambda config, device: None)


def test_reward_with_wrong_batch_size_raises():
    reward_fn = CombinedReward({"short": lambda inputs: {"short": torch.zeros(1)}}, {"short": 1.0})
    with pytest.raises(ValueError, match="expected 2 scores"):
        reward_fn(_inputs(BLANK))


@pytest.mark.parametrize(
    "frames",
    [
        torch.zeros(1, 2, 8, 8, 3),  # float
        torch.zeros(1, 2, 8, 8, 3, dtype=torch.int32),
        torch.zeros(1, 8, 8, 3, dtype=torch.uint8),  # no frame axis
        torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8),  # channels first
    ],
)
def test_reward_inputs_reject_bad_frames(frames):
    with pytest.raises(ValueError, match="uint8"):
        _inputs(frames)


def test_reward_inputs_reject_mismatched_batch():
    with pytest.raises(ValueError, match="batch size"):
        RewardInputs(BLANK, [[Image.new("RGB", (8, 8))]], ["one prompt", "two prompts"])


def _uniform_frames(*colours_per_frame, size=(16, 24)):
    """(1, F, H, W, 3) uint8 video whose frame f is filled with colours_per_frame[f]."""
    frames = torch.tensor(colours_per_frame, dtype=torch.uint8)[:, None, None, :]
    return frames.expand(len(colours_per_frame), *size, 3)[None].contiguous()


def _score(frames, references):
    fn = ref_similarity(None, torch.device("cpu"))
    return fn(RewardInputs(frames, [references] * frames.shape[0], ["p"] * frames.shape[0]))["ref_similarity"]


def test_ref_similarity_is_one_for_frames_equal_to_a_uniform_reference():
    colour = (10, 200, 30)
    score = _score(_uniform_frames(colour, colour), [Image.new("RGB", (40, 32), colour)])
    assert score.item() == pytest.approx(1.0, abs=1e-6)


def test_ref_similarity_two_colours_by_hand():
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    # Frame (51, 102, 0) = (0.2, 0.4, 0) vs red (1, 0, 0): mean |diff| = (0.8 + 0.4 + 0) / 3 = 0.4 -> 0.6
    assert _score(_uniform_frames((51, 102, 0)), [red]).item() == pytest.approx(0.6, abs=1e-6)
    # A red frame then a white one: distances 0 and (0 + 1 + 1) / 3, averaged over frames -> 1 - 1/3
    assert _score(_uniform_frames((255, 0, 0), (255, 255, 255)), [red]).item() == pytest.approx(2 / 3, abs=1e-6)


def test_ref_similarity_averages_multiple_references():
    # Black and white references average to grey 0.5; a white frame is 0.5 away in every channel.
    references = [Image.new("RGB", (16, 16), (0, 0, 0)), Image.new("RGB", (16, 16), (255, 255, 255))]
    assert _score(_uniform_frames((255, 255, 255)), references).item() == pytest.approx(0.5, abs=1e-6)


def test_ref_similarity_compares_position_by_position():
    # Reference: left half white, right half black. A frame with the halves swapped differs by 1
    # everywhere (similarity 0); the matching frame scores 1.
    reference = Image.new("RGB", (16, 16), (0, 0, 0))
    reference.paste((255, 255, 255), (0, 0, 8, 16))
    matching = torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8)
    matching[..., :8, :] = 255
    swapped = 255 - matching
    scores = _score(torch.cat([matching, swapped]), [reference])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def test_identity_reward_ensemble_is_the_mean_of_its_members(tmp_path):
    """``pretrained.reward_model = "A,B"``: the ``identity`` score is the mean of what A and B give
    alone (each member's own score logged as ``identity/model<i>``)."""
    from ml_collections import ConfigDict

    import identity_grpo.rewards.identity  # noqa: F401  (registers "identity")
    from vace_reward.testing import write_tiny_reward_model

    folders = [str(write_tiny_reward_model(tmp_path / f"reward_{seed}", seed=seed)) for seed in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    inputs = RewardInputs(frames=torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8, generator=generator),
                          reference_images=[[Image.new("RGB", (32, 32), (40 * i, 90, 200))] for i in range(3)],
                          prompts=["a man walks", "a woman stands", "two men"])

    def identity_scores(path: str) -> dict[str, torch.Tensor]:
        config = ConfigDict({"reward_fn": {"identity": 1.0}, "pretrained": {"reward_model": path},
                             "reward_model": {"batch_size": 2, "fps": 10.0}})
        return REGISTRY["identity"](config, torch.device("cpu"))(inputs)

    alone = [identity_scores(folder)["identity"] for folder in folders]
    assert not torch.allclose(alone[0], alone[1])  # two different models, or the mean proves nothing
    ensemble = identity_scores(" , ".join(folders))
    torch.testing.assert_close(ensemble["identity"], (alone[0] + alone[1]) / 2)
    torch.testing.assert_close(ensemble["identity/model0"], alone[0])
    torch.testing.assert_close(ensemble["identity/model1"], alone[1])


def test_reward_modules_add_a_users_reward_file_to_the_registry(tmp_path):
    """``config.reward_modules``: a user's own file registers a reward that the config check and
    build_reward_fn then know; importing it again (check, then build) registers nothing twice."""
    from config.dgx import get_config
    from identity_grpo.configuration import validate_config

    name = "_test_user_contrast"
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "import torch\n"
        "from identity_grpo.rewards import register\n\n"
        f"@register({name!r})\n"
        "def contrast(config, device):\n"
        "    def fn(inputs):\n"
        "        grey = inputs.frames.float().mean(dim=-1) / 255.0  # (B, F, H, W)\n"
        f"        return {{{name!r}: grey.flatten(2).std(dim=-1).mean(dim=1)}}\n"
        "    return fn\n")
    config = get_config("tiny")
    config.reward_fn = {name: 1.0}
    with pytest.raises(ValueError, match=name):  # unknown without the module
        validate_config(config)
    config.reward_modules = str(path)
    try:
        validate_config(config)
        reward_fn = build_reward_fn(config, torch.device("cpu"))
        # One frame, half black and half white: every pixel 0.5 from the mean grey 0.5.
        frames = torch.zeros(2, 1, 8, 8, 3, dtype=torch.uint8)
        frames[0, :, :, 4:] = 255
        scores, _ = reward_fn(_inputs(frames))
        assert scores[name].tolist() == pytest.approx([0.5 * (64 / 63) ** 0.5, 0.0], abs=1e-6)
    finally:
        REGISTRY.pop(name, None)


@pytest.mark.parametrize("entry", ["does/not/exist.py", "no_such_module_for_rewards"])
def test_reward_modules_that_do_not_import_name_the_field_and_the_entry(entry):
    from config.dgx import get_config
    from identity_grpo.configuration import validate_config

    config = get_config("tiny")
    config.reward_modules = f"  {entry} , "
    with pytest.raises(ValueError, match="config.reward_modules: could not import " + repr(entry)):
        validate_config(config)
    with pytest.raises(ValueError, match="config.reward_modules"):
        build_reward_fn(config, torch.device("cpu"))


def test_a_reward_module_that_fails_leaves_the_registry_as_it_was(tmp_path):
    """A user's file that clashes with a built-in name, or registers a reward and then fails, is a
    config error naming the field; the registry keeps nothing of it."""
    from config.dgx import get_config

    clash = tmp_path / "clash.py"
    clash.write_text("from identity_grpo.rewards import register\n\n@register('brightness')\n"
                     "def mine(config, device):\n    return None\n")
    broken = tmp_path / "broken.py"
    broken.write_text("from identity_grpo.rewards import register\n\n@register('_test_half_registered')\n"
                      "def mine(config, device):\n    return None\n\nraise RuntimeError('a bug in the user file')\n")
    from identity_grpo.rewards import registered_rewards

    registered_rewards()  # the built-ins, as import_reward_modules imports them first
    config = get_config("tiny")
    config.reward_fn = {"brightness": 1.0}
    for path, message in ((clash, "'brightness' registered twice"), (broken, "a bug in the user file")):
        registered = set(REGISTRY)
        config.reward_modules = str(path)
        with pytest.raises(ValueError, match="config.reward_modules: could not import") as error:
            build_reward_fn(config, torch.device("cpu"))
        assert message in str(error.value) and set(REGISTRY) == registered
    from identity_grpo.rewards.pixel import brightness
    assert REGISTRY["brightness"] is brightness
