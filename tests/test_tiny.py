"""The tiny StableLM: the committed model's held-out quality and layout, its corpus, and the trainer that made it
(a short run into a throw-away cache, so the trainer cannot rot)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from quantkit import tiny
from quantkit.chat import STABLELM_SYSTEM_PROMPT, chat_template, render_prompt, stop_token_ids
from quantkit.corpus import load_corpus
from quantkit.errors import QuantkitError
from quantkit.shapes import STABLELM_TOKENIZER

# The tiny model before this corpus (pydoc topics only, 4000 ids, 2 layers, 96 steps; commit ffedca0, retrained by
# its own code: 114.4 on its own split, as it recorded) scores held-out perplexity 342.0 on this corpus' held-out
# split (tiny._heldout_perplexity on its saved checkpoint). The committed model must beat that threefold.
PREVIOUS_MODEL_HELDOUT_PERPLEXITY = 342.0
MAX_WEIGHT_BYTES = 16 * 2**20  # the one file allowed past the 5 MB rule
SHORT_RUN = tiny.Settings(vocab=512, hidden=64, layers=1, heads=2, context=64, batch=8, steps=40, lr=1e-2, warmup=4,
                          weight_decay=0.0, bf16=True)


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
def corpus(shared_data) -> tuple[str, str]:
    return load_corpus()


def recomputed_perplexity(folder: Path, heldout: str) -> tuple[float, int]:
    """Held-out perplexity from the saved checkpoint: mean next-token NLL over non-overlapping windows of the
    model's context length, each window scored on its own."""
    model = GPTNeoXForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    ids = tokenizer.encode(heldout)
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


def check_special_ids(tokenizer, system: int) -> None:
    """StableLM's layout: <|endoftext|>=0, <|padding|>=1, then <|SYSTEM|>, <|USER|>, <|ASSISTANT|> as the last ids."""
    expected = {"<|endoftext|>": 0, "<|padding|>": 1, "<|SYSTEM|>": system, "<|USER|>": system + 1,
                "<|ASSISTANT|>": system + 2}
    for text, token_id in expected.items():
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id], text
    assert stop_token_ids(tokenizer) == [system + 1, system + 2, system, 1, 0]
    assert system + 3 == len(tokenizer)


def test_heldout_perplexity_as_recorded_and_a_third_of_the_previous_model(own, corpus):
    metrics = json.loads((own / "metrics.json").read_text())
    perplexity, count = recomputed_perplexity(own, corpus[1])
    assert count == metrics["heldout_tokens"] > 100_000
    assert perplexity == pytest.approx(metrics["heldout_perplexity"], rel=1e-3)
    assert perplexity <= PREVIOUS_MODEL_HELDOUT_PERPLEXITY / 3, perplexity
    assert metrics["key"]["corpus_sha256"]  # which corpus it was trained on is on record


def test_corpus_is_chat_documents_from_four_sources_with_unseen_heldout(corpus, shared_data):
    train, heldout = corpus
    heldout_docs = heldout.split("<|endoftext|>")
    assert heldout_docs.pop() == ""
    assert 8 <= train.count("<|endoftext|>") / len(heldout_docs) <= 10
    for doc in [*heldout_docs, *train.split("<|endoftext|>")[:-1]]:
        assert doc.startswith(f"<|SYSTEM|>{STABLELM_SYSTEM_PROMPT}<|USER|>") and "<|ASSISTANT|>" in doc
    assert not any(doc + "<|endoftext|>" in train for doc in heldout_docs)  # no held-out document was trained on
    # The HH test split holds dialogues that a longer dialogue of the same split continues: 10 held-out ones are the
    # opening of a training dialogue (1.4 % of the held-out text beyond the system prompts). Keep it that small.
    prefixes = [doc.partition("<|USER|>")[2] for doc in heldout_docs if doc in train]
    assert sum(map(len, prefixes)) < 0.02 * len(heldout), len(prefixes)
    questions = [doc.partition("<|USER|>")[2] for doc in heldout_docs]
    every_question = questions + train.split("<|USER|>")
    assert any(q.startswith('Explain The "assert" statement.') for q in every_question)  # pydoc
    assert any(q.startswith("Explain How to use sessions.") for q in every_question)  # Django
    assert not any(q.startswith("Explain Django 5.2 release notes.") for q in every_question)  # no change logs
    assert any(q.startswith("Tell me about ") for q in questions)  # WikiText-2 valid
    assert sum(doc.count("<|USER|>") > 1 for doc in heldout_docs) > 50  # multi-turn HH dialogues
    test_split = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    first_test_article = test_split.split("\n")[1].strip(" =")  # "Robert Boulter"
    assert first_test_article and first_test_article not in train + heldout


def test_checkpoint_is_stablelm_shaped_fp16_and_within_the_size_limit(own):
    config = json.loads((own / "model" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["rotary_pct"] == 0.25 and config["rotary_emb_base"] == 10000
    assert config["use_parallel_residual"] is True and config["tie_word_embeddings"] is False
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-5
    assert config["intermediate_size"] == 4 * config["hidden_size"]
    weights = own / "model" / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    with safe_open(weights, "pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"F16"}
    model = GPTNeoXForCausalLM.from_pretrained(own / "model", dtype=torch.float32)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25


def test_tokenizer_has_stablelm_ids_a_portable_class_and_the_chat_template(own):
    tokenizer = AutoTokenizer.from_pretrained(own / "model")
    size = len(tokenizer)
    assert size == tiny.VARIANTS["own"].vocab
    check_special_ids(tokenizer, system=size - 3)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 1)
    prompt = tokenizer.encode(render_prompt("Explain the assert statement."), add_special_tokens=False)
    assert prompt[0] == size - 3 and prompt[-1] == size - 1 and prompt.count(size - 2) == 1
    rows = json.loads((own / "model" / "config.json").read_text())["vocab_size"]
    assert rows > size and rows % 128 == 0
    saved = json.loads((own / "model" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "GPTNeoXTokenizer"  # transformers 5 alone knows "TokenizersBackend"
    assert saved["chat_template"] == chat_template()


def test_tokenizer_is_reproducible_from_train_text(own, corpus):
    saved = AutoTokenizer.from_pretrained(own / "model")
    assert tiny._train_tokenizer(corpus[0], len(saved)).get_vocab() == saved.get_vocab()


def test_greedy_demo_answer_is_on_topic_readable_english(tiny_backend):
    from quantkit.chat import Sampler
    from quantkit.cli import DEMO_PROMPT
    from quantkit.runner import generate

    tokenizer = tiny_backend.tokenizer
    prompt = tokenizer(render_prompt(DEMO_PROMPT))["input_ids"]
    (result,) = generate(tiny_backend, [prompt], max_new_tokens=64, sampler=Sampler(vocab_limit=len(tokenizer)),
                         stop_ids=stop_token_ids(tokenizer))
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert "plant" in text.lower(), text  # the subject of "How do I plant tomatoes?"
    assert len(words) >= 15 and sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", "")), text
    assert text.count("\n\n\n") == 0, text


def test_committed_model_is_refused_when_the_settings_changed(monkeypatch):
    changed = dataclasses.replace(tiny.VARIANTS["own"], steps=tiny.VARIANTS["own"].steps + 1)
    monkeypatch.setitem(tiny.VARIANTS, "own", changed)
    with pytest.raises(QuantkitError, match="make tiny-model"):
        tiny.tiny_folder()


def test_trainer_short_run_loss_falls_and_the_cache_is_keyed_by_settings(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    folder = tiny.cached_folder("own", SHORT_RUN)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["final_train_loss"] < metrics["first_train_loss"] - 1.0, metrics
    assert metrics["heldout_perplexity"] < SHORT_RUN.vocab and metrics["steps"] == SHORT_RUN.steps
    model = GPTNeoXForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    assert model.config.hidden_size == SHORT_RUN.hidden and model.config.max_position_embeddings == SHORT_RUN.context

    monkeypatch.setattr(tiny, "_train", lambda *args: pytest.fail("retrained although the cache was valid"))
    assert tiny.cached_folder("own", SHORT_RUN) == folder
    other = dataclasses.replace(SHORT_RUN, seed=1)
    assert tiny.training_key("own", other) != tiny.training_key("own", SHORT_RUN)
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        tiny.cached_folder("own", other)  # other settings: another model, so it trains
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tiny-own") and not p.name.endswith(".lock")] \
        == [folder.name]  # the failed training left nothing behind


def test_bad_variant_and_missing_data_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(QuantkitError, match="unknown tiny-model tokenizer"):
        tiny.tiny_folder("gpt2")
    monkeypatch.setenv("QUANTKIT_DATA", str(tmp_path / "absent"))
    with pytest.raises(QuantkitError, match="StableLM tokenizer"):
        tiny.tiny_folder("stablelm")
    with pytest.raises(QuantkitError, match="shared data folder"):
        load_corpus()


@pytest.mark.slow
def test_stablelm_tokenizer_variant(shared_data):
    """The variant on the real StableLM tokenizer learns: its recorded held-out perplexity (scored by the same code
    whose figure the "own" model's test recomputes from the saved checkpoint) is far below uniform."""
    if not (shared_data / STABLELM_TOKENIZER).is_dir():
        pytest.skip(f"{STABLELM_TOKENIZER} is absent from the shared data")
    folder = tiny.tiny_folder("stablelm")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    assert len(tokenizer) == 50280
    check_special_ids(tokenizer, system=50277)
    rows = json.loads((folder / "model" / "config.json").read_text())["vocab_size"]
    assert rows > 50280 and rows % 128 == 0
    perplexity = json.loads((folder / "metrics.json").read_text())["heldout_perplexity"]
    assert perplexity <= len(tokenizer) / 50, perplexity
