"""Prompts: the R1 system prompt of the blog post and the TRL recipe, the chat messages and the SFT target.

`build_messages(example)` gives the conversation `processor.apply_chat_template` renders (system,
then user: one image item per image, then the question); `format_target(example)` is the
assistant's text for SFT. Used by data/collators.py; nothing here touches tensors.

Run:  python -c "from data.prompts import *; print(build_messages({'images': [1], 'question': 'Q?'}))"
"""

from __future__ import annotations

# The system prompt both seeds use (taken from DeepSeek-R1 through open-r1).
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def format_target(example: dict) -> str:
    """The SFT target (what the assistant turn says): R1 format, think then answer.

    With a trace:     "<think>{thinking}</think>\\n<answer>{answer}</answer>", the layout the blog post's
                      strict format reward matches (r"^<think>...</think>\\n<answer>...</answer>$").
    Without a trace:  "<answer>{answer}</answer>". We do not invent an empty <think></think>: a row
                      without a trace teaches the answer only (the format reward then has to teach
                      the thinking part during GRPO, or the data should carry traces).
    """
    answer = str(example["answer"]).strip()
    thinking = example.get("thinking")
    if thinking is None:
        return f"<answer>{answer}</answer>"
    return f"<think>{str(thinking).strip()}</think>\n<answer>{answer}</answer>"


def build_messages(example: dict, *, system_prompt: str | None = SYSTEM_PROMPT,
                   with_target: bool = False) -> list[dict]:
    """Chat messages for `processor.apply_chat_template` (content lists of typed dicts).

    system turn (omitted when system_prompt is None), then the user turn: one {"type": "image"}
    item per image of `example["images"]` (the images themselves go to the processor separately,
    in the same order), then the question; with_target adds the assistant turn `format_target`.
    """
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    images = example.get("images") or []
    user_content = [{"type": "image"} for _ in images]
    user_content.append({"type": "text", "text": example["question"]})
    messages.append({"role": "user", "content": user_content})
    if with_target:
        messages.append({"role": "assistant",
                         "content": [{"type": "text", "text": format_target(example)}]})
    return messages
