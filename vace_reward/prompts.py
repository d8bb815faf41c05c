"""The reward model's instruction text, in one place.

The reward model reads a chat-formatted sequence: a system turn, then one user turn holding the
reference images, the video and the instruction, then the opening of the assistant turn. The
instruction contains the reward token(s); the reward head reads the last hidden state at each of
them. The exact text is part of the model: it is saved in ``reward_config.json`` with every
checkpoint and read back from there, so a checkpoint is always scored with the text it was
trained on. The constants below are only the defaults of a new model.

The chat layout reproduces what Qwen2.5-VL's own chat template produces with
``add_vision_id=True, add_generation_prompt=True`` (the layout the upstream reward model was
trained with), written out here so that scoring does not depend on the template a processor
happens to ship with.
"""

from __future__ import annotations

REWARD_TOKEN = "<|SA_reward|>"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The subject-alignment instruction of the released Identity-GRPO reward model (Apache-2.0,
# alibaba/identity-grpo, `subject_alignment_special`). Kept verbatim, leading and trailing
# newlines included: the released weights were trained on exactly this text.
SUBJECT_ALIGNMENT_INSTRUCTION = """
Your task is to evaluate the quality of the video generated based on the all above reference images in the Subject alignment criteria. Please provide a rating from 0 to 10 for Subject alignment criteria, with 0 being the worst and 10 being the best. 

**Subject Alignment:**  
Evaluate the degree of similarity between the human face in the generated video and the human face in all the reference images above.
The following sub-dimensions should be considered:
1. **Per-Face Similarity (Highest Priority)**  
   For each reference face, evaluate whether it appears in the video and how closely it matches, in this order:  
   a. **Facial structure and expression** – eye shape, nose, mouth, jawline, symmetry, emotion — *most important*  
   b. **Hairstyle, hair color, and facial hair**  
   c. **Skin tone and complexion**  
   d. **Clothing and accessories** (e.g., glasses, hats) — *only supportive clues*

   → A single strong facial match (especially in structure and expression) outweighs multiple weak or superficial matches.

Please provide the rating of subject alignment: <|SA_reward|>
END
"""

# Chat-format pieces (Qwen2 chat markup).
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def build_reward_text(
    instruction: str,
    num_references: int,
    prompt: str = "",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The full input text for one sample, before the processor expands the vision pads.

    Args:
        instruction: the instruction, containing the reward token(s). ``{text_prompt}`` in it,
            if present, is replaced by ``prompt`` (the released instruction does not use it).
        num_references: how many reference images precede the video (``Picture 1: ...``).
        prompt: the generation prompt of the video.
        system_prompt: text of the system turn.

    Returns:
        ``<|im_start|>system ... <|im_start|>user\\nPicture 1: <image> ... Video 1: <video>
        {instruction}<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    if "{text_prompt}" in instruction:
        instruction = instruction.replace("{text_prompt}", prompt)
    pictures = "".join(f"Picture {index + 1}: {_IMAGE}" for index in range(num_references))
    return (
        f"{_IM_START}system\n{system_prompt}{_IM_END}\n"
        f"{_IM_START}user\n{pictures}Video 1: {_VIDEO}{instruction}{_IM_END}\n"
        f"{_IM_START}assistant\n"
    )
