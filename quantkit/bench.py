"""Speed through the shared runner: prefill and decode tokens/s, time to first token, memory, % of roofline.

Every figure comes from `runner.generate`, the loop users run. Each measurement has a warm-up call, then
`repeats` calls; the median is reported with the min and max. Decode is read against the memory-bandwidth
roofline: a decode step must read every weight once, so at batch B the ceiling is
bandwidth / weight bytes steps per second, i.e. B times that in tokens/s.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from quantkit.backends.base import Backend
from quantkit.chat import Sampler, render_prompt, stop_token_ids
from quantkit.runner import Timings, generate

PROMPT_LENGTHS = (128, 512, 2048)
DECODE_BATCHES = (1, 8)


@dataclass(frozen=True)
class BenchSettings:
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS
    decode_batches: tuple[int, ...] = DECODE_BATCHES
    decode_tokens: int = 64
    repeats: int = 3
    bandwidth_gbs: float | None = None  # datasheet value; measured by a copy test when None


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(call: Callable[[], Timings], repeats: int, figure: Callable[[Timings], float]) -> dict[str, float]:
    call()  # warm-up: allocator, kernel selection, compiled graphs
    return spread([figure(call()) for _ in range(repeats)])


def copy_bandwidth_gbs(device: str, megabytes: int = 256) -> float:
    """Memory bandwidth measured on the spot: a large tensor copy reads and writes every byte once."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best / 1e9


def filler_prompt(tokenizer: PreTrainedTokenizerBase, length: int) -> list[int]:
    """A real chat prompt, its user text repeated until it is `length` tokens long."""
    ids = tokenizer(render_prompt("Explain how the Python import system finds modules. " * 400))["input_ids"]
    return ids[-length:]


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def benchmark(backend: Backend, settings: BenchSettings) -> dict:
    """All speed figures for one backend, as a JSON-ready dict."""
    greedy = Sampler(vocab_limit=len(backend.tokenizer))
    result: dict = {"backend": backend.name, "device": backend.device, "prefill": {}}

    chat_prompt = backend.tokenizer(render_prompt("What is GPTQ?"))["input_ids"]
    stops = stop_token_ids(backend.tokenizer)
    result["ttft_ms"] = {k: v * 1000 for k, v in measure(
        lambda: generate(backend, [chat_prompt], 1, greedy, stops)[0].timings, settings.repeats,
        lambda t: t.ttft_s).items()}

    for length in settings.prompt_lengths:
        if length >= backend.max_positions:
            continue
        prompt = filler_prompt(backend.tokenizer, length)
        result["prefill"][str(length)] = measure(
            lambda: generate(backend, [prompt], 1, greedy, stop_ids=[])[0].timings, settings.repeats,
            lambda t: t.prefill_tok_s)

    result["bandwidth_gbs"] = settings.bandwidth_gbs or copy_bandwidth_gbs(backend.device)
    result["decode_weight_bytes"] = backend.decode_weight_bytes
    result["decode"] = decode_speed(backend, settings, result["bandwidth_gbs"])
    result["peak_memory_bytes"] = peak_memory_bytes(backend.device)
    return result


def decode_speed(backend: Backend, settings: BenchSettings, bandwidth_gbs: float) -> dict[str, dict[str, float]]:
    """Decode tokens/s per batch size after the chat prompt (greedy, no stop tokens), with % of the roofline."""
    greedy = Sampler(vocab_limit=len(backend.tokenizer))
    chat_prompt = backend.tokenizer(render_prompt("What is GPTQ?"))["input_ids"]
    result = {}
    for batch in settings.decode_batches:
        prompts = [chat_prompt] * batch
        tok_s = measure(
            lambda: generate(backend, prompts, settings.decode_tokens, greedy, stop_ids=[])[0].timings,
            settings.repeats, lambda t: t.decode_tok_s)
        roofline_tok_s = batch * bandwidth_gbs * 1e9 / backend.decode_weight_bytes
        result[str(batch)] = {**tok_s, "roofline_pct": 100 * tok_s["median"] / roofline_tok_s}
    return result
