"""The trained tiny StableLM: held-out quality, StableLM tokenizer layout, cache reuse and atomic cache writes.

The first run trains the "own" model (and the "stablelm" one where the shared data exists) into the quantkit
cache; later runs reuse it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from quantkit import tiny
from quantkit.chat import STABLELM_SYSTEM_PROMPT, render_prompt, stop_token_ids
from quantkit.errors import QuantkitError
from quantkit.paths import data_dir
from quantkit.sources import STABLELM_TOKENIZER


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin-wait and run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def own() -> Path:
    return tiny.tiny_folder()


@pytest.fixture(scope="module")
def stablelm() -> Path:
    shared = data_dir(required=False)
    if shared is None or not (shared / STABLELM_TOKENIZER).is_dir():
        pytest.skip(f"shared data with {STABLELM_TOKENIZER} is absent (set QUANTKIT_DATA)")
    return tiny.tiny_folder("stablelm")


def recomputed_perplexity(folder: Path) -> tuple[float, int]:
    """Held-out perplexity from the saved checkpoint: mean next-token NLL over non-overlapping windows of the
    model's context length, each window scored on its own."""
    model = GPTNeoXForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    ids = tokenizer.encode((folder / "heldout.txt").read_text(encoding="utf-8"))
    context = model.config.max_position_embeddings
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = torch.tensor([ids[start : start + context]])
            if window.shape[1] < 2:
                continue
            logprobs = model(input_ids=window).logits[0, :-1].log_softmax(dim=-1)
            nll -= logprobs.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    return math.exp(nll / count), count


def check_perplexity(folder: Path) -> None:
    metrics = json.loads((folder / "metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    perplexity, count = recomputed_perplexity(folder)
    assert count == metrics["heldout_tokens"] > 2000
    assert perplexity == pytest.approx(metrics["heldout_perplexity"], rel=1e-3)
    assert perplexity <= len(tokenizer) / 10, f"held-out perplexity {perplexity:.0f} is not far below uniform"


def check_special_ids(tokenizer, system: int) -> None:
    """StableLM's layout: <|endoftext|>=0, <|padding|>=1, then <|SYSTEM|>, <|USER|>, <|ASSISTANT|> as the last ids."""
    expected = {"<|endoftext|>": 0, "<|padding|>": 1, "<|SYSTEM|>": system, "<|USER|>": system + 1,
                "<|ASSISTANT|>": system + 2}
    for text, token_id in expected.items():
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id], text
    assert stop_token_ids(tokenizer) == [system + 1, system + 2, system, 1, 0]
    assert system + 3 == len(tokenizer)


def test_heldout_perplexity_far_below_uniform(own: Path) -> None:
    check_perplexity(own)


def test_documents_are_chat_turns_and_heldout_is_unseen(own: Path) -> None:
    train = (own / "train.txt").read_text(encoding="utf-8")
    heldout_docs = (own / "heldout.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    assert heldout_docs.pop() == ""
    assert train.startswith(f"<|SYSTEM|>{STABLELM_SYSTEM_PROMPT}<|USER|>Explain ")
    assert 8 <= train.count("<|endoftext|>") // len(heldout_docs) <= 10
    for doc in heldout_docs:
        prompt, _, answer = doc.partition("<|ASSISTANT|>")
        assert prompt.startswith(f"<|SYSTEM|>{STABLELM_SYSTEM_PROMPT}<|USER|>Explain ")
        assert answer and answer not in train


def test_checkpoint_is_stablelm_shaped(own: Path) -> None:
    config = json.loads((own / "model" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"
    assert config["rotary_pct"] == 0.25 and config["rotary_emb_base"] == 10000
    assert config["use_parallel_residual"] is True and config["tie_word_embeddings"] is False
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-5
    assert config["intermediate_size"] == 4 * config["hidden_size"]
    model = GPTNeoXForCausalLM.from_pretrained(own / "model")
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert next(model.parameters()).dtype == torch.float32
    assert (own / "model" / "model.safetensors").is_file()


def test_tokenizer_has_stablelm_special_ids(own: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(own / "model")
    size = len(tokenizer)
    assert 3500 <= size <= 4096
    check_special_ids(tokenizer, system=size - 3)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 1)
    prompt = tokenizer.encode(render_prompt("Explain the assert statement."), add_special_tokens=False)
    assert prompt[0] == size - 3 and prompt[-1] == size - 1 and prompt.count(size - 2) == 1
    rows = json.loads((own / "model" / "config.json").read_text())["vocab_size"]
    assert rows > size and rows % 128 == 0


def test_tokenizer_is_reproducible_from_train_text(own: Path) -> None:
    saved = AutoTokenizer.from_pretrained(own / "model")
    retrained = tiny._train_tokenizer((own / "train.txt").read_text(encoding="utf-8"), len(saved))
    assert retrained.get_vocab() == saved.get_vocab()


def test_second_call_reuses_cache(own: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = own / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setattr(tiny, "_train", lambda *args: pytest.fail("retrained although the cache was valid"))
    start = time.perf_counter()
    assert tiny.tiny_folder() == own
    assert time.perf_counter() - start < 10
    assert weights.stat().st_mtime_ns == before


def test_failed_training_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args):
        raise RuntimeError("simulated crash")

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "_train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny.tiny_folder()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_bad_variant_and_missing_data_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantkitError, match="unknown tiny-model tokenizer"):
        tiny.tiny_folder("gpt2")
    monkeypatch.setenv("QUANTKIT_DATA", str(tmp_path / "absent"))
    with pytest.raises(QuantkitError, match="StableLM tokenizer"):
        tiny.tiny_folder("stablelm")


@pytest.mark.slow
def test_stablelm_tokenizer_variant(stablelm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stablelm / "model")
    assert len(tokenizer) == 50280
    check_special_ids(tokenizer, system=50277)
    rows = json.loads((stablelm / "model" / "config.json").read_text())["vocab_size"]
    assert rows > 50280 and rows % 128 == 0
    check_perplexity(stablelm)
