"""Perplexity with a pinned method, and agreement with a reference model (KL divergence, top-1), via any backend.

Method (stated in `quantkit eval --help` and the README):
- Plain text is scored as published: the whole text tokenized once, then windows of `window` tokens starting
  every `stride` tokens; each window scores only the tokens no earlier window scored (the first window scores
  all but its first token), so every token after the first is scored exactly once, with up to
  `window - stride` tokens of context.
- Dialogues are rendered in the StableLM prompt format with the card's system prompt; only assistant tokens are
  scored, one dialogue per sequence, truncated to `window` tokens.
- Log-probabilities are taken over the tokenizer's ids: logit rows past it are padding and are excluded.
- Word and byte perplexity divide the same total negative log-likelihood by the whitespace-separated words and
  UTF-8 bytes of the scored text (as lm-evaluation-harness does); bits per byte = nll / bytes / ln 2.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from quantkit.backends.base import Backend
from quantkit.chat import render_dialogue
from quantkit.data import Dataset
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class Segment:
    """One sequence to score: `scored[i]` says whether token ids[i] (predicted from ids[:i]) counts."""

    ids: list[int]
    scored: list[bool]


@dataclass(frozen=True)
class Method:
    window: int
    stride: int
    batch_size: int = 4

    def __post_init__(self) -> None:
        # Windows must overlap: a window's first token has no context inside it, so it cannot be scored there.
        if not 0 < self.stride < self.window:
            raise QuantkitError(f"stride must be in 1..{self.window - 1} (below the window), got {self.stride}")


def text_segments(ids: Sequence[int], window: int, stride: int) -> list[Segment]:
    """Strided windows over one token stream; every token after the first is scored exactly once."""
    segments, scored_until = [], 1
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + window, len(ids))
        if end <= scored_until:
            continue
        piece = list(ids[begin:end])
        segments.append(Segment(piece, [begin + i >= scored_until for i in range(len(piece))]))
        scored_until = end
        if end == len(ids):
            break
    return segments


def dialogue_segments(tokenizer, dialogues, window: int) -> list[Segment]:
    segments = []
    for turns in dialogues:
        ids, scored = render_dialogue(tokenizer, turns)
        if any(scored[1:window]):
            segments.append(Segment(ids[:window], [False] + scored[1:window]))
    return segments


def scored_text_units(dataset: Dataset) -> tuple[int, int]:
    """(words, UTF-8 bytes) of the text being scored: the whole text, or the assistant turns."""
    texts = [dataset.text] if dataset.text is not None else [t for d in dataset.dialogues for r, t in d if r == "assistant"]
    return sum(len(re.split(r"\s+", t.strip())) for t in texts), sum(len(t.encode("utf-8")) for t in texts)


def segments_for(backend: Backend, dataset: Dataset, method: Method) -> list[Segment]:
    if dataset.text is not None:
        ids = backend.tokenizer(dataset.text)["input_ids"]
        if len(ids) < 2:
            raise QuantkitError(f"dataset '{dataset.name}' has fewer than two tokens")
        return text_segments(ids, method.window, method.stride)
    return dialogue_segments(backend.tokenizer, dataset.dialogues, method.window)


def scored_logprobs(backend: Backend, segments: Sequence[Segment], method: Method, desc: str = "scoring",
                    rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each batch: (fp32 log-probs [n, rows] at the scored positions, target ids [n]), in segment order.

    `rows` defaults to the tokenizer's ids (the method); backend.vocab_rows normalizes over every logit row,
    padding included, as servers that know no tokenizer size do (vLLM)."""
    vocab = rows or len(backend.tokenizer)
    pad = backend.tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(segments), method.batch_size), desc=desc, unit="batch", leave=False):
        batch = segments[start : start + method.batch_size]
        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, seg in enumerate(batch):  # right padding: causal attention keeps real positions exact
            ids[row, : len(seg.ids)] = torch.tensor(seg.ids)
            mask[row, : len(seg.ids)] = 1
            targets[row, : len(seg.ids)] = torch.tensor(seg.scored)
        positions = torch.arange(width).expand(len(batch), width)
        logits, _ = backend.forward(
            ids.to(backend.device), positions.to(backend.device), mask.to(backend.device),
            backend.new_cache(len(batch)), last_only=False,
        )
        # logits[:, t] predicts token t + 1
        picked = logits[:, :-1, :vocab][targets[:, 1:].to(logits.device)].float().cpu()
        yield torch.log_softmax(picked, dim=-1), ids[:, 1:][targets[:, 1:]]


@dataclass
class Perplexity:
    tokens: int
    nll: float
    words: int
    bytes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "nll_sum": self.nll,
            "token_perplexity": math.exp(self.nll / self.tokens),
            "word_perplexity": math.exp(self.nll / self.words),
            "byte_perplexity": math.exp(self.nll / self.bytes),
            "bits_per_byte": self.nll / self.bytes / math.log(2),
        }


def perplexity(backend: Backend, dataset: Dataset, method: Method,
               on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Perplexity:
    """Perplexity of `backend` on `dataset` by the pinned method; `on_batch` sees every batch's log-probs."""
    segments = segments_for(backend, dataset, method)
    nll, tokens = 0.0, 0
    for logprobs, targets in scored_logprobs(backend, segments, method, desc=f"{backend.name} on {dataset.name}"):
        nll -= logprobs.gather(1, targets[:, None]).sum().item()
        tokens += len(targets)
        if on_batch is not None:
            on_batch(logprobs, targets)
    if tokens == 0:
        raise QuantkitError(f"dataset '{dataset.name}' has no tokens to score")
    words, nbytes = scored_text_units(dataset)
    return Perplexity(tokens, nll, words, nbytes)
