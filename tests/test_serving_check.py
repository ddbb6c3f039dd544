"""The downstream fixtures' own pieces: the chat cases render as the chat template does, and the broken copies'
defects are the ones they claim (the downstream suite itself runs in the consumers' environments: make downstream)."""
from __future__ import annotations

import torch

from quantkit.export.gptq_layout import unpack_nibbles
from quantkit.serving_check import CHATS, pack_nibbles, render_messages, reverse_nibbles, shift_zero_points
from quantkit.sources import load_tokenizer, model_folder


def test_chat_cases_render_as_the_chat_template():
    tokenizer = load_tokenizer(model_folder("tiny"))
    for messages in CHATS.values():
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_messages(messages)


def test_nibble_packing_round_trips_and_defects_do_what_they_say():
    words = torch.randint(-2**31, 2**31 - 1, (16, 24), dtype=torch.int32)
    for dim in (0, 1):
        assert torch.equal(pack_nibbles(unpack_nibbles(words, dim), dim), words)
    assert torch.equal(unpack_nibbles(shift_zero_points(words), 1), (unpack_nibbles(words, 1) + 1) % 16)
    reversed_fields = unpack_nibbles(reverse_nibbles(words), 0).view(-1, 8, 24)
    assert torch.equal(reversed_fields, unpack_nibbles(words, 0).view(-1, 8, 24).flip(1))
