"""Calibration samples for GPTQ: token windows of plain text and StableLM-format dialogues, mixed by weight.

A spec is a quantkit.data dataset spec with an optional `:weight` suffix (`tiny-train:3 alpaca-sample:1`); the
samples are shared out in proportion to the weights. Plain text is tokenized once and cut into `seqlen`-token
windows; dialogues are rendered exactly as the runner prompts the model (system prompt, chat tokens) and cut to
`seqlen` tokens. Which windows or dialogues are used is drawn from a generator seeded by `seed`, so the same
specs, seed and tokenizer always give the same samples. Test/evaluation splits are refused unless allowed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from quantkit.chat import render_dialogue
from quantkit.data import Dataset, is_evaluation_split, load_dataset
from quantkit.errors import QuantkitError
from quantkit.sources import TINY_PRESETS, parse_spec

DEFAULT_CALIB = ("wikitext2-valid",)
TINY_CALIB = ("tiny-train",)
MIN_TOKENS = 10  # gptqmodel silently drops shorter rows (calibration_data_min_length)


@dataclass(frozen=True)
class CalibSpec:
    dataset: str
    weight: float = 1.0


def parse_calib_spec(text: str) -> CalibSpec:
    """`SPEC[:WEIGHT]`; the suffix counts as a weight only when it is a number, so `hub:NAME:SPLIT` still works."""
    name, sep, suffix = text.rpartition(":")
    if sep:
        try:
            weight = float(suffix)
        except ValueError:
            return CalibSpec(text)
        if not (weight > 0 and math.isfinite(weight)):
            raise QuantkitError(f"calibration weight must be a positive number, got '{suffix}' in '{text}'")
        return CalibSpec(name, weight)
    return CalibSpec(text)


def default_calib(model: str, calib: tuple[str, ...]) -> tuple[str, ...]:
    """The tiny presets calibrate on their own training text when the generic default was left in place."""
    if calib == DEFAULT_CALIB and parse_spec(model).preset in TINY_PRESETS:
        return TINY_CALIB
    return calib


def check_not_evaluation(specs: list[CalibSpec], allow_eval_split: bool) -> None:
    for spec in specs:
        if is_evaluation_split(spec.dataset) and not allow_eval_split:
            raise QuantkitError(
                f"'{spec.dataset}' looks like a test/evaluation split: calibrating on it would leak into the "
                "evaluation (pass --force-calib-split to do it anyway)"
            )


def share_out(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder, ties to the earlier spec)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def candidates(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, seqlen: int) -> list[list[int]]:
    """Every sample a dataset can give: whole `seqlen` windows of its text (or the text itself when shorter than
    one window), or each dialogue in the prompt format cut to `seqlen` tokens."""
    if dataset.text is not None:
        ids = tokenizer(dataset.text)["input_ids"]
        windows = [ids[i : i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
        pool = windows or [ids]
    else:
        pool = [render_dialogue(tokenizer, turns)[0][:seqlen] for turns in dataset.dialogues]
    return [ids for ids in pool if len(ids) >= MIN_TOKENS]


@dataclass(frozen=True)
class CalibSource:
    """A loaded calibration dataset and how many samples it contributes."""

    dataset: Dataset
    count: int


def load_calibration(specs: tuple[str, ...], samples: int, allow_eval_split: bool = False) -> list[CalibSource]:
    """Parse, vet and load the calibration specs, sharing `samples` out by weight (before any model is loaded,
    so bad data fails fast)."""
    parsed = [parse_calib_spec(text) for text in specs]
    if not parsed:
        raise QuantkitError("no calibration dataset given")
    check_not_evaluation(parsed, allow_eval_split)
    counts = share_out(samples, [spec.weight for spec in parsed])
    return [CalibSource(load_dataset(spec.dataset), count) for spec, count in zip(parsed, counts)]


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, sources: list[CalibSource], seqlen: int, seed: int
) -> list[dict[str, list[int]]]:
    """Rows of at most `seqlen` tokens as gptqmodel takes them, {"input_ids", "attention_mask"}, drawn by `seed`.

    A dataset with fewer candidates than its share gives all it has.
    """
    rng = random.Random(seed)
    rows: list[list[int]] = []
    for source in sources:
        pool = candidates(source.dataset, tokenizer, seqlen)
        if not pool:
            raise QuantkitError(f"calibration dataset '{source.dataset.name}' has no sample of {MIN_TOKENS}+ tokens")
        rows += [pool[i] for i in sorted(rng.sample(range(len(pool)), min(source.count, len(pool))))]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows]
