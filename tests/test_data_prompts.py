"""Tests for data/prompts.py: message structure and the SFT target format.
Run: python -m pytest tests/test_data_prompts.py -q"""

from __future__ import annotations

import re

from data.prompts import SYSTEM_PROMPT, build_messages, format_target

# The seed's strict format reward (blog 000): think, a newline, answer, nothing else.
STRICT_FORMAT = r"^<think>([\s\S]*?)</think>\n<answer>([\s\S]*?)</answer>$"


def test_system_prompt_is_the_r1_prompt():
    assert SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert SYSTEM_PROMPT.endswith("<think> reasoning process here </think><answer> answer here </answer>")


def test_messages_have_one_image_item_per_image_then_the_question():
    example = {"images": ["img0", "img1"], "question": "How many cubes are there?", "answer": "2"}
    messages = build_messages(example)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": SYSTEM_PROMPT}]
    assert messages[1]["content"] == [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "How many cubes are there?"}]
    assert [m["role"] for m in build_messages(example, system_prompt=None)] == ["user"]


def test_with_target_adds_the_assistant_turn():
    example = {"images": [None], "question": "Q?", "answer": " 3 ", "thinking": "1 + 2 = 3."}
    messages = build_messages(example, with_target=True)
    assert messages[-1] == {"role": "assistant", "content": [
        {"type": "text", "text": "<think>1 + 2 = 3.</think>\n<answer>3</answer>"}]}


def test_target_matches_the_strict_format_reward():
    target = format_target({"answer": "4", "thinking": "I see 4 cubes. That makes 4."})
    assert re.fullmatch(STRICT_FORMAT, target)
    # Without a trace: answer only, no invented empty <think></think>.
    assert format_target({"answer": "4", "thinking": None}) == "<answer>4</answer>"
    assert format_target({"answer": 4}) == "<answer>4</answer>"
