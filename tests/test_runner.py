"""The shared KV-cache loop against transformers' own generate, per-row stopping, streaming."""
from __future__ import annotations

import json

import pytest
import torch

from quantkit.chat import Sampler, render_prompt, stop_token_ids
from quantkit.errors import QuantkitError
from quantkit.runner import generate

QUESTIONS = ["Explain the assert statement.", "What does the with statement do?", "Tell me about integer literals and how Python parses them."]


def encode(backend, questions):
    return [backend.tokenizer(render_prompt(q))["input_ids"] for q in questions]


def reference_generate(backend, prompts, max_new_tokens, stops):
    """transformers' generate on the same left-padded batch, padding rows of the vocab suppressed."""
    pad = backend.tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = backend.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=pad,
        suppress_tokens=list(range(len(backend.tokenizer), backend.vocab_rows)) or None,
    )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


# At the 3B width only the left-padded batch: it covers batch 1's path too, and each case there costs ~40 s.
@pytest.mark.parametrize("fixture, batch", [("tiny_backend", 1), ("tiny_backend", 3), ("neox3b_2layer_backend", 3)])
def test_greedy_equals_transformers_generate(request, fixture, batch):
    backend = request.getfixturevalue(fixture)
    prompts = encode(backend, QUESTIONS[:batch])
    assert batch == 1 or len({len(p) for p in prompts}) == batch  # different lengths: real left padding
    stops = stop_token_ids(backend.tokenizer)
    results = generate(backend, prompts, 24, Sampler(vocab_limit=len(backend.tokenizer)), stops)
    expected = reference_generate(backend, prompts, 24, stops)
    assert [r.token_ids for r in results] == expected
    assert all(r.token_ids for r in results)


def test_left_padded_row_equals_its_solo_run(tiny_backend):
    prompts = encode(tiny_backend, QUESTIONS)
    stops = stop_token_ids(tiny_backend.tokenizer)
    batched = generate(tiny_backend, prompts, 16, Sampler(), stops)
    solo = generate(tiny_backend, prompts[:1], 16, Sampler(), stops)
    assert batched[0].token_ids == solo[0].token_ids


def first_index(tokens, stop):
    return tokens.index(stop) if stop in tokens else len(tokens)


def test_each_row_stops_at_its_own_stop_token(tiny_backend):
    prompts = encode(tiny_backend, QUESTIONS)
    sampler = lambda: Sampler(temperature=1.0, seed=4)  # sampled rows differ from each other; same seed, same draws
    free = generate(tiny_backend, prompts, 20, sampler(), stop_ids=[])
    assert all(len(r.token_ids) == 20 and r.stop_reason == "length" for r in free)
    # Declare a token that row 0 emits mid-way a stop token, picked so that rows reach it at different steps.
    stop = next(t for t in free[0].token_ids[3:]
                if len({first_index(r.token_ids, t) for r in free}) > 1)
    stopped = generate(tiny_backend, prompts, 20, sampler(), stop_ids=[stop])
    for before, after in zip(free, stopped):
        cut = first_index(before.token_ids, stop)
        assert after.token_ids == before.token_ids[:cut]  # nothing at or after its own stop token
        assert after.stop_token == (stop if cut < 20 else None)
        assert after.stop_reason == ("stop_token" if cut < 20 else "length")


def test_tokens_stream_in_order_and_timings_are_filled(tiny_backend):
    prompts = encode(tiny_backend, QUESTIONS[:2])
    seen: dict[int, list[int]] = {0: [], 1: []}
    results = generate(tiny_backend, prompts, 12, Sampler(), stop_token_ids(tiny_backend.tokenizer),
                       on_token=lambda row, tok: seen[row].append(tok))
    assert [seen[0], seen[1]] == [r.token_ids for r in results]
    t = results[0].timings
    assert t.prompt_tokens == sum(map(len, prompts))
    assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tokens == sum(len(r.token_ids) for r in results) - 2 + sum(r.stop_token is not None for r in results)


def test_seeded_sampling_through_the_loop(tiny_backend):
    prompts = encode(tiny_backend, QUESTIONS[:1])

    def run(seed):
        return generate(tiny_backend, prompts, 16, Sampler(temperature=1.0, seed=seed), stop_ids=[])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


class CountingBackend:
    """The tiny backend, counting forward calls (a refused request must not run one)."""

    def __init__(self, backend) -> None:
        self.backend, self.forwards = backend, 0

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.backend.forward(*args, **kwargs)


def test_request_past_the_context_is_refused_before_any_work(tiny_backend):
    backend = CountingBackend(tiny_backend)
    prompts = encode(tiny_backend, QUESTIONS)
    longest = max(map(len, prompts))
    room = tiny_backend.max_positions - longest
    with pytest.raises(QuantkitError) as error:
        generate(backend, prompts, room + 1, Sampler(), stop_ids=[])
    assert str(error.value) == (f"the prompt's {longest} tokens + max_new_tokens {room + 1} = {longest + room + 1} "
                                f"exceed the model's 256 positions (at most {room} new tokens fit)")
    assert backend.forwards == 0
    exact = generate(backend, prompts, room, Sampler(), stop_ids=[])  # exactly filling the context is allowed
    assert [len(r.token_ids) for r in exact] == [room] * 3 and {r.stop_reason for r in exact} == {"length"}


def test_cap_to_context_fits_the_longest_prompt_and_says_so(tiny_backend):
    prompts = encode(tiny_backend, QUESTIONS)
    room = tiny_backend.max_positions - max(map(len, prompts))
    capped = generate(tiny_backend, prompts, 1000, Sampler(), stop_ids=[], cap_to_context=True)
    assert [len(r.token_ids) for r in capped] == [room] * 3
    assert {r.stop_reason for r in capped} == {"context"}
    assert [r.token_ids for r in capped] == [r.token_ids for r in generate(tiny_backend, prompts, room, Sampler(), [])]
    stopped = generate(tiny_backend, prompts, 1000, Sampler(), stop_token_ids(tiny_backend.tokenizer),
                       cap_to_context=True)
    assert all(r.stop_reason == ("stop_token" if r.stop_token is not None else "context") for r in stopped)


def test_a_prompt_that_fills_the_context_is_refused_even_when_capping(tiny_backend):
    prompt = [5] * tiny_backend.max_positions
    with pytest.raises(QuantkitError, match="prompt's 256 tokens leave no room for a new token in the model's 256"):
        generate(tiny_backend, [prompt], 1, Sampler(), stop_ids=[], cap_to_context=True)


def test_backends_report_their_configs_positions(tiny_backend, tiny_onnx_fp32):
    from quantkit.backends import open_backend

    config = json.loads((tiny_onnx_fp32 / "config.json").read_text())
    assert tiny_backend.max_positions == config["max_position_embeddings"] == 256
    assert open_backend(str(tiny_onnx_fp32), device="cpu").max_positions == 256
