"""Agreement with a reference model on the same scored tokens, like llama.cpp's --kl-divergence.

The reference's fp32 log-probabilities over the tokenizer's ids are cached on disk as a memory-mapped .npy,
keyed by the reference, the data and the method, for the first `max_tokens` scored tokens (a full-vocabulary row
is 200 KB at StableLM's 50280 ids, so the whole of WikiText-2 would not fit). The candidate is then scored on the
same windows and compared row by row: KL(reference || candidate), top-1 agreement, and the change in the
probability of the correct token.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantkit.backends.base import Backend
from quantkit.data import Dataset
from quantkit.evaluate import Method, Perplexity, perplexity
from quantkit.paths import cache_dir


@dataclass
class ReferenceRows:
    """The reference's cached log-prob rows and its perplexity on the same data."""

    path: Path
    perplexity: dict

    def rows(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def reference_key(reference_id: str, dataset: Dataset, method: Method, max_tokens: int) -> str:
    content = dataset.text if dataset.text is not None else json.dumps(dataset.dialogues)
    blob = json.dumps([reference_id, dataset.name, hashlib.sha256(content.encode()).hexdigest(),
                       method.window, method.stride, max_tokens])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def reference_rows(open_reference: Callable[[], Backend], reference_id: str, dataset: Dataset, method: Method,
                   max_tokens: int) -> ReferenceRows:
    """Score the reference once and cache its first `max_tokens` log-prob rows (atomic write). The reference is
    opened only on a cache miss, so a cached one costs no memory."""
    folder = cache_dir() / "reference" / reference_key(reference_id, dataset, method, max_tokens)
    rows_path, info_path = folder / "logprobs.npy", folder / "perplexity.json"
    if info_path.is_file():
        return ReferenceRows(rows_path, json.loads(info_path.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    chunks: list[np.ndarray] = []
    kept = 0

    def keep(logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        nonlocal kept
        if kept < max_tokens:
            chunk = logprobs[: max_tokens - kept].numpy()
            chunks.append(chunk)
            kept += len(chunk)

    result = perplexity(open_reference(), dataset, method, on_batch=keep)
    tmp = folder / f"logprobs.{os.getpid()}.tmp.npy"
    np.save(tmp, np.concatenate(chunks))
    os.replace(tmp, rows_path)
    info_path.write_text(json.dumps(result.as_dict()))
    return ReferenceRows(rows_path, result.as_dict())


@dataclass
class Agreement:
    """Per-token comparison figures, accumulated batch by batch."""

    kl: list[np.ndarray] = field(default_factory=list)
    same_top1: int = 0
    delta_p: list[np.ndarray] = field(default_factory=list)

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> None:
        ref_p = reference.exp()
        kl = (ref_p * (reference - candidate)).sum(dim=-1).clamp(min=0.0)
        self.kl.append(kl.numpy())
        self.same_top1 += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        rows = torch.arange(len(targets))
        self.delta_p.append((candidate[rows, targets].exp() - ref_p[rows, targets]).numpy())

    def summary(self) -> dict[str, float]:
        kl, dp = np.concatenate(self.kl).astype(np.float64), np.concatenate(self.delta_p).astype(np.float64)
        return {
            "kl_tokens": int(len(kl)),
            "kl_mean": float(kl.mean()),
            "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": self.same_top1 / len(kl),
            "delta_p_mean": float(dp.mean()),
            "delta_p_rms": float(np.sqrt((dp**2).mean())),
        }


def compare(candidate: Backend, reference: ReferenceRows, dataset: Dataset, method: Method) -> tuple[Perplexity, dict]:
    """The candidate's perplexity and its agreement figures against the cached reference rows."""
    rows = reference.rows()
    agreement = Agreement()
    seen = 0

    def check(logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        nonlocal seen
        take = min(len(targets), len(rows) - seen)
        if take > 0:
            ref = torch.from_numpy(np.array(rows[seen : seen + take]))
            agreement.add(ref, logprobs[:take], targets[:take])
            seen += take

    result = perplexity(candidate, dataset, method, on_batch=check)
    figures = agreement.summary()
    figures["perplexity_ratio"] = result.as_dict()["token_perplexity"] / reference.perplexity["token_perplexity"]
    return result, figures
