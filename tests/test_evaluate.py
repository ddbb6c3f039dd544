"""Perplexity method, KL/top-1 agreement, chat-format scoring mask, report tables, bad input."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from quantkit.agreement import compare, reference_rows
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import render_dialogue
from quantkit.cli import main
from quantkit.data import Dataset, load_dataset
from quantkit.evaluate import Method, perplexity, text_segments
from quantkit import report
from quantkit.report import EvalRequest, evaluate_backend

TEXT = ("The assert statement is a convenient way to insert debugging assertions into a program. "
        "The simple form evaluates the expression and raises AssertionError when it is false. ") * 6


@pytest.mark.parametrize("length, window, stride", [(10, 4, 1), (10, 4, 3), (37, 8, 3), (5, 16, 4), (100, 32, 31)])
def test_strided_windows_score_every_token_after_the_first_exactly_once(length, window, stride):
    scored = []
    for segment in text_segments(list(range(length)), window, stride):
        assert len(segment.ids) <= window and not segment.scored[0]
        scored += [token for token, flag in zip(segment.ids, segment.scored) if flag]
    assert scored == list(range(1, length))


def direct_perplexity(backend, ids, window, stride):
    """Sum of NLL over scored tokens / count, window by window, without the tool's batching."""
    nll, count, scored_until = 0.0, 0, 1
    vocab = len(backend.tokenizer)
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end <= scored_until:
            continue
        chunk = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(backend.model(chunk).logits[0, :, :vocab].float(), -1)
        for pos in range(max(scored_until, begin + 1), end):
            nll -= logp[pos - begin - 1, ids[pos]].item()
            count += 1
        scored_until = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window, stride", [(64, 16), (48, 47)])
def test_perplexity_equals_direct_computation(tiny_backend, window, stride):
    ids = tiny_backend.tokenizer(TEXT)["input_ids"]
    assert len(ids) > 2 * window
    result = perplexity(tiny_backend, Dataset("t", text=TEXT), Method(window, stride, batch_size=3))
    expected, count = direct_perplexity(tiny_backend, ids, window, stride)
    assert result.tokens == count == len(ids) - 1
    assert result.as_dict()["token_perplexity"] == pytest.approx(expected, rel=1e-5)


def test_model_against_itself_and_against_a_perturbed_copy(tiny_backend, isolated_cache):
    dataset, method = Dataset("t", text=TEXT), Method(64, 32, batch_size=2)
    rows = reference_rows(lambda: tiny_backend, "tiny|self", dataset, method, max_tokens=10_000)
    _, same = compare(tiny_backend, rows, dataset, method)
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["perplexity_ratio"] == 1.0
    assert same["kl_tokens"] == len(tiny_backend.tokenizer(TEXT)["input_ids"]) - 1

    perturbed = copy.deepcopy(tiny_backend.model)
    with torch.no_grad():
        for layer in perturbed.gpt_neox.layers:
            weight = layer.mlp.dense_h_to_4h.weight
            weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    _, other = compare(TorchBackend(perturbed, tiny_backend.tokenizer, "perturbed"), rows, dataset, method)
    assert other["kl_mean"] > 1e-3 and other["top1_agreement"] < 1.0
    assert other["delta_p_rms"] > 0


def test_a_cached_reference_is_not_opened_again(tiny_backend, isolated_cache, monkeypatch):
    """Its rows are on disk: opening it again would hold a second model in memory for nothing (a 3B on CPU)."""
    request = EvalRequest(data="tiny-heldout[:3000]", reference="tiny", window=128, stride=64, kld_tokens=500,
                          dtype="fp32", device="cpu")
    first = evaluate_backend(tiny_backend, request)
    monkeypatch.setattr(report, "open_backend", lambda *args, **kwargs: pytest.fail("the reference was opened"))
    second = evaluate_backend(tiny_backend, request)
    assert second == first and first["agreement"]["kl_tokens"] == 500


def test_chat_perplexity_scores_only_assistant_tokens(tiny_backend):
    tokenizer = tiny_backend.tokenizer
    turns = [("user", "What is a tuple?"), ("assistant", "An immutable sequence."),
             ("user", "And a list?"), ("assistant", "A mutable one.")]
    ids, scored = render_dialogue(tokenizer, turns, system="Be brief.\n")
    assert tokenizer.decode(ids) == ("<|SYSTEM|>Be brief.\n<|USER|>What is a tuple?<|ASSISTANT|>An immutable sequence."
                                     "<|USER|>And a list?<|ASSISTANT|>A mutable one.")
    assert tokenizer.decode([t for t, s in zip(ids, scored) if s]) == "An immutable sequence.A mutable one."
    result = perplexity(tiny_backend, Dataset("d", dialogues=[turns]), Method(256, 64))
    assert result.tokens == sum(scored)


def test_shared_hh_dialogues_load_as_turns(shared_data):
    dialogues = load_dataset("hh-helpful-test").dialogues
    assert len(dialogues) == 2354
    assert dialogues[0][0][0] == "user" and dialogues[0][1][0] == "assistant"
    assert dialogues[0][0][1].startswith("Do you know why turkeys")


def test_head_of_a_dataset(shared_data):
    assert load_dataset("tiny-heldout[:500]").text == load_dataset("tiny-heldout").text[:500]
    assert load_dataset("hh-helpful-test[:3]").dialogues == load_dataset("hh-helpful-test").dialogues[:3]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_one_row_per_model_every_column_filled(capsys, tmp_path, isolated_cache):
    code, out, err = run_cli(
        capsys, "report", "--models", "tiny", "tiny", "--dtype", "fp32", "--name", "t", "--results", str(tmp_path),
        "--data", "tiny-heldout[:6000]", "--window", "128", "--kld-tokens", "1000", "--prompt-lengths", "64",
        "--batches", "1", "2", "--decode-tokens", "4", "--repeats", "1")
    assert code == 0, err
    record = json.loads((tmp_path / "t.json").read_text())
    assert json.loads(json.dumps(record)) == record and len(record["rows"]) == 2
    assert record["machine"]["cores"] >= 1
    table = (tmp_path / "t.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| torch")]
    assert len(rows) == 2 and all("—" not in row for row in rows)
    assert record["rows"][1]["eval"]["agreement"]["kl_mean"] == 0.0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--data", "no-such-set"], "unknown dataset 'no-such-set'"),
    (["--data", "tiny-heldout[:0]"], "dataset 'tiny-heldout[:0]': the head must be at least 1"),
    (["--data", "EMPTY"], "dataset is empty"),
    (["--data", "tiny-heldout", "--window", "100000"], "exceeds the model's"),
    (["--data", "tiny-heldout", "--window", "64", "--stride", "64"], "stride must be in 1..63"),
])
def test_eval_bad_input_is_a_one_line_error(capsys, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", *args)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
