"""quantkit's fp16 and int4 ONNX folders, as exported, in optimum's ORTModelForCausalLM (transformers 4.x) and in
onnxruntime-genai; and the tokenizer files and chat template read by transformers 4.x.

Tolerances, measured on the committed tiny model's 8 held-out windows of 128 tokens (1016 scored tokens), against
quantkit's ONNX backend (onnxruntime with IO binding) on the same folder:
- optimum and onnxruntime-genai run the same graph on the same onnxruntime: mean |Δ log-prob| 6.7e-7, max 5.0e-6
  (fp16) and 6.8e-7, max 5.1e-6 (int4): the float64 log-softmax here vs quantkit's fp32 one.
Both are held to mean 1e-5, max 1e-4: a rounding difference, nothing more. The broken copies: fp16 exported from
rotary_pct 0.5, mean 1.1, max 12; int4 exported from zero points off by one, mean 0.11, max 0.91.
"""
from __future__ import annotations

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

from expected import Tolerance, artifact, assert_fails, assert_matches, assert_same_continuation

SAME_RUNTIME = Tolerance(mean=1e-5, max=1e-4)
GOOD = ("onnx-fp16", "onnx-int4")
BROKEN = ("onnx-fp16-wrong-rotary", "onnx-int4-zeros-off-by-one")


def window_logprobs(logits: np.ndarray, window: list[int], vocab: int) -> list[float]:
    """log p(token | earlier tokens) over the tokenizer's ids, from one window's logits [T, rows]."""
    x = torch.from_numpy(np.asarray(logits[:-1, :vocab], dtype=np.float64))
    return torch.log_softmax(x, -1).gather(1, torch.tensor(window[1:])[:, None]).squeeze(1).tolist()


def check_logprobs(name: str, logprobs) -> None:
    """`logprobs(entry)`: the consumer's log-probs of the windows; good ones agree, broken ones must not."""
    entry = artifact(name)
    got = logprobs(entry)
    if "broken_of" in entry:
        assert_fails(got, entry["logprobs"], SAME_RUNTIME)
    else:
        assert_matches(got, entry["logprobs"], SAME_RUNTIME)


# ---- optimum ----------------------------------------------------------------------------------------------------


def optimum_logprobs(entry: dict) -> list[list[float]]:
    model = ORTModelForCausalLM.from_pretrained(entry["folder"])
    rows = []
    for window in entry["windows"]:
        ids = torch.tensor([window])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()
        rows.append(window_logprobs(logits, window, entry["vocab"]))
    return rows


@pytest.mark.parametrize("name", GOOD + BROKEN)
def test_optimum_teacher_forced_logprobs(name):
    check_logprobs(name, optimum_logprobs)


@pytest.mark.parametrize("name", GOOD)
def test_optimum_greedy_and_card_stops(name):
    """generate() with the folder's generation_config.json (eos = the card's stop ids): greedy = quantkit's runner;
    each stop id, when the model emits it (forced by a sequence bias), ends the answer; an ordinary one does not."""
    entry = artifact(name)
    model = ORTModelForCausalLM.from_pretrained(entry["folder"])
    assert model.generation_config.eos_token_id == entry["stop_ids"]
    for case in entry["chats"].values():
        ids = torch.tensor([case["prompt_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=entry["continuation"])[0, ids.shape[1]:].tolist()
        assert_same_continuation(out, case, SAME_RUNTIME)
    prompt = torch.tensor([entry["chats"]["card-system"]["prompt_ids"]])
    ordinary = entry["chats"]["card-system"]["tokens"][0]
    for forced in (*entry["stop_ids"], ordinary):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=4,
                             sequence_bias={(forced,): 100.0})[0, prompt.shape[1]:].tolist()
        assert out == ([forced] if forced in entry["stop_ids"] else [forced] * 4)


@pytest.mark.parametrize("name", GOOD)
def test_transformers4_tokenizer_and_chat_template(name):
    """transformers 4.x reads the tokenizer files; apply_chat_template renders exactly the card prompt."""
    entry = artifact(name)
    tokenizer = AutoTokenizer.from_pretrained(entry["folder"])
    for case in entry["chats"].values():
        assert tokenizer(case["prompt"])["input_ids"] == case["prompt_ids"]
        assert tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True) == case["prompt_ids"]


# ---- onnxruntime-genai ------------------------------------------------------------------------------------------


def genai_generator(model: og.Model, prompt: list[int], new_tokens: int) -> og.Generator:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    return generator


def genai_logprobs(entry: dict) -> list[list[float]]:
    model = og.Model(entry["folder"])
    return [window_logprobs(genai_generator(model, w, 1).get_output("logits")[0], w, entry["vocab"])
            for w in entry["windows"]]


def genai_continue(generator: og.Generator, prompt_length: int, force: int | None = None) -> list[int]:
    """Run to the end (greedy, genai_config.json's search defaults); `force` wins every step, like a logit bias."""
    while not generator.is_done():
        if force is not None:
            logits = np.array(generator.get_logits())
            logits[..., force] = 1e4
            generator.set_logits(logits)
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[prompt_length:]]


@pytest.mark.parametrize("name", GOOD + BROKEN)
def test_genai_teacher_forced_logprobs(name):
    check_logprobs(name, genai_logprobs)


@pytest.mark.parametrize("name", GOOD)
def test_genai_tokenizer_greedy_and_card_stops(name):
    """og.Tokenizer encodes the card prompt to quantkit's ids; greedy = quantkit's runner; genai_config.json's eos
    (the card's stop ids) ends generation at each stop id, and not at an ordinary token."""
    entry = artifact(name)
    model = og.Model(entry["folder"])
    tokenizer = og.Tokenizer(model)
    for case in entry["chats"].values():
        assert [int(t) for t in tokenizer.encode(case["prompt"])] == case["prompt_ids"]
        generator = genai_generator(model, case["prompt_ids"], entry["continuation"])
        assert_same_continuation(genai_continue(generator, len(case["prompt_ids"])), case, SAME_RUNTIME)
    prompt = entry["chats"]["card-system"]["prompt_ids"]
    ordinary = entry["chats"]["card-system"]["tokens"][0]
    for forced in (*entry["stop_ids"], ordinary):
        out = genai_continue(genai_generator(model, prompt, 4), len(prompt), force=forced)
        assert out == ([] if forced in entry["stop_ids"] else [forced] * 4), (forced, out)

