"""Pretraining the world reward model's backbone to see the world, before its preference training.

A real Qwen2.5-VL starts its reward training able to see: it names colours, hair and who stands
where. The world's reward model starts from random weights, and preference pairs alone did not
teach it to look (it fits its own training pairs of generated videos only 64-76% right;
docs/tiny_world.md). This is the toy counterpart of the real model's pretraining: captioning.
The backbone (vision tower and language model, every weight) learns by next-token prediction to
describe what it is shown, in the reward model's own input format (the references, then the
video, then the reward token) with the description as the assistant's answer:

    picture 1: tan red short. picture 2: pale blond long. video: tan red short, pale blond long.

Half of the samples show references of other people than the video's, drawn independently, so
the video's half of the description cannot be copied from the pictures: each must be seen. Only
training identities appear (the reward model's held-out people stay unseen). The reward head is
not touched; the captioning only changes where the preference training starts from.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from identity_grpo.world.render import Identity, Scene, render_reference, render_video, sample_scene

logger = logging.getLogger(__name__)


def describe(identity: Identity) -> str:
    """The three words a caption says of a person: skin, hair colour, hair style."""
    return f"{identity.skin} {identity.hair} {identity.style}"


def caption(scene: Scene, references: list[Identity]) -> str:
    """What the captioning teaches: each picture's person, then the video's people left to right."""
    pictures = " ".join(f"picture {index + 1}: {describe(person)}." for index, person in enumerate(references))
    return f"{pictures} video: {', '.join(describe(person) for person in scene.people)}."


def draw_scene_and_references(rng: np.random.Generator, identities,
                              num_frames: int = 5) -> tuple[Scene, list[Identity]]:
    """A random scene and its references: its own people with probability 1/2, else 1 or 2 other,
    independently drawn people."""
    scene = sample_scene(rng, identities, num_frames)
    if rng.random() < 0.5:
        return scene, list(scene.people)
    count = int(rng.integers(1, 3))
    return scene, [identities[i] for i in rng.choice(len(identities), size=count, replace=False)]


def render_sample(scene: Scene, references: list[Identity], num_frames: int = 5, size: int = 32):
    """``(video (F, H, W, 3) uint8, reference images, prompt, caption)`` of a scene and references."""
    return (render_video(scene, size, num_frames), [render_reference(person) for person in references],
            scene.prompt, caption(scene, references))


def captioning_sample(rng: np.random.Generator, identities, num_frames: int = 5, size: int = 32):
    """``(video (F, H, W, 3) uint8, reference images, prompt, caption)``: a drawn scene, and with
    probability 1/2 references of other, independently drawn people (1 or 2 of them)."""
    return render_sample(*draw_scene_and_references(rng, identities, num_frames), num_frames, size)


def captioning_batch(scorer, samples, end_token: str = "<|im_end|>") -> dict[str, torch.Tensor]:
    """Processor outputs of ``samples`` with the captions as the assistant's answers, and
    ``labels``: the caption tokens (and the closing token), -100 elsewhere."""
    tokenizer = scorer.processor.tokenizer
    prepared = []
    caption_lengths = []
    for video, references, prompt, text in samples:
        sample = scorer.prepare(scorer.sample_frames(torch.from_numpy(video), fps=16.0), references, prompt)
        answer = text + end_token
        caption_lengths.append(len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
        prepared.append(dataclasses.replace(sample, text=sample.text + answer))
    batch = scorer.process(prepared)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, length in enumerate(caption_lengths):
        last = int(batch["attention_mask"][row].nonzero().max())
        labels[row, last - length + 1:last + 1] = batch["input_ids"][row, last - length + 1:last + 1]
    batch["labels"] = labels
    return batch


def caption_segments(scene: Scene, references: list[Identity]) -> list[tuple[str, str]]:
    """:func:`caption` (and the closing token) cut into ``(text, part)`` pieces at word boundaries,
    ``part`` naming what a piece says: "picture" / "video" for an attribute word, "" otherwise.
    The pieces tokenize separately into the caption's own tokens (tested)."""
    segments = []
    for index, person in enumerate(references):
        segments += [(f"{' ' if index else ''}picture {index + 1}:", "")]
        segments += [(f" {word}", "picture") for word in describe(person).split()] + [(".", "")]
    segments.append((" video:", ""))
    for index, person in enumerate(scene.people):
        segments += [(",", "")] if index else []
        segments += [(f" {word}", "video") for word in describe(person).split()]
    return segments + [(".<|im_end|>", "")]


@torch.no_grad()
def caption_accuracy(model, processor, identities, *, num_samples: int = 128, seed: int = 1,
                     batch_size: int = 16) -> dict[str, float]:
    """Held-out captioning, teacher-forced, on ``num_samples`` fresh samples: the fraction of
    attribute words (skin, hair, style) predicted entirely right, of the pictures' and of the
    video's people (chance: about 1/3 per word once the model knows which words come where)."""
    from vace_reward.inference import IdentityRewardScorer

    scorer = IdentityRewardScorer(model, processor)
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(seed)
    right = {"picture": 0, "video": 0}
    total = {"picture": 0, "video": 0}
    for start in range(0, num_samples, batch_size):
        drawn = []
        for _ in range(min(batch_size, num_samples - start)):
            scene, references = draw_scene_and_references(rng, identities)
            drawn.append((scene, references, render_sample(scene, references)))
        batch = captioning_batch(scorer, [sample for _, _, sample in drawn])
        labels = batch.pop("labels")
        hits = (model.backbone(**batch, use_cache=False).logits.argmax(-1)[:, :-1] == labels[:, 1:])
        for row, (scene, references, _) in enumerate(drawn):
            # hits[row, i] says whether token i + 1 was predicted; start at the caption's first.
            position = int((labels[row, 1:] != -100).nonzero().min())
            for text, part in caption_segments(scene, references):
                length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if part:
                    right[part] += int(hits[row, position:position + length].all())
                    total[part] += 1
                position += length
    return {part: right[part] / total[part] for part in right}


def pretrain_backbone(model, processor, identities, *, steps: int, batch_size: int = 16,
                      learning_rate: float = 1e-3, seed: int = 0, log_every: int = 100) -> list[float]:
    """Train every backbone weight of ``model`` (an IdentityRewardModel) to caption drawn world
    samples over ``identities``, in place. Returns the mean captioning loss of each ``log_every``
    steps (the first entry is the loss at the start)."""
    from vace_reward.inference import IdentityRewardScorer

    scorer = IdentityRewardScorer(model, processor)
    backbone = model.backbone
    backbone.train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    losses, window = [], []
    start = time.time()
    progress = tqdm(range(steps), desc="captioning", leave=False)
    for step in progress:
        batch = captioning_batch(scorer, [captioning_sample(rng, identities) for _ in range(batch_size)])
        loss = backbone(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if step == 0:
            losses.append(window[0])
        if len(window) == log_every or step == steps - 1:
            losses.append(float(np.mean(window)))
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            logger.info("captioning step %d: loss %.4f (%.0f s)", step + 1, losses[-1], time.time() - start)
            window = []
    backbone.eval()
    return losses
