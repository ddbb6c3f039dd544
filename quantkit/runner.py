"""The one generation loop: prefill the left-padded batch once, then one token per step over the KV cache."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from quantkit.backends.base import Backend
from quantkit.chat import Sampler
from quantkit.errors import QuantkitError

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each token is accepted


@dataclass
class Timings:
    """Wall-clock figures of one `generate` call (shared by its rows)."""

    prefill_s: float = 0.0  # prompt forward + first token
    decode_s: float = 0.0  # every later step
    prompt_tokens: int = 0  # real (non-padding) prompt tokens
    decode_tokens: int = 0  # tokens produced by decode steps, over all rows

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "ttft_s": self.ttft_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
        }


@dataclass
class Generation:
    """One row's result: the new tokens (stop token excluded) and why it ended."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stop_token: int | None = None  # the stop id that ended the row; None when the length limit did
    timings: Timings = field(default_factory=Timings)
    context_capped: bool = False  # max_new_tokens was cut to what the model's positions leave

    @property
    def stop_reason(self) -> str:
        """'stop_token', 'context' (ran into the capped length) or 'length' (ran into max_new_tokens)."""
        if self.stop_token is not None:
            return "stop_token"
        return "context" if self.context_capped else "length"


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts in one [B, T] batch; returns input ids and the 0/1 attention mask."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only (padding gets 0), as transformers' generate does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def synchronize(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def fit_context(longest_prompt: int, max_new_tokens: int, max_positions: int, cap: bool) -> int:
    """`max_new_tokens`, or with `cap` the most that fit beside the longest prompt; refuses (QuantkitError) what
    cannot fit, as vLLM does: prompt + max_new_tokens must not exceed the model's positions."""
    room = max_positions - longest_prompt
    if longest_prompt + max_new_tokens <= max_positions:
        return max_new_tokens
    if cap and room >= 1:
        return room
    if room < 1:
        raise QuantkitError(f"the prompt's {longest_prompt} tokens leave no room for a new token in the model's "
                            f"{max_positions} positions")
    raise QuantkitError(f"the prompt's {longest_prompt} tokens + max_new_tokens {max_new_tokens} = "
                        f"{longest_prompt + max_new_tokens} exceed the model's {max_positions} positions "
                        f"(at most {room} new tokens fit)")


def generate(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: Sequence[int],
    on_token: TokenCallback | None = None,
    *,
    cap_to_context: bool = False,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; each row stops at its own stop token or at the length limit.

    A request that would run past `backend.max_positions` is refused before any work, or with `cap_to_context`
    its `max_new_tokens` is cut to what fits (rows that reach that cut report stop reason "context").
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    asked = max_new_tokens
    max_new_tokens = fit_context(max(map(len, prompts)), asked, backend.max_positions, cap_to_context)
    device = backend.device
    pad_id = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else 0
    stops = set(stop_ids)
    input_ids, mask = left_pad(prompts, pad_id, device)
    results = [Generation(prompt_ids=list(p), context_capped=max_new_tokens < asked) for p in prompts]
    timings = Timings(prompt_tokens=int(mask.sum()))
    for result in results:
        result.timings = timings
    active = list(range(len(prompts)))

    start = synchronize(device)
    logits, cache = backend.forward(input_ids, positions(mask), mask, backend.new_cache(len(prompts)))
    next_tokens = sampler(logits[:, -1])
    next_positions = positions(mask)[:, -1:] + 1
    for step in range(max_new_tokens):
        sampled = next_tokens.tolist()  # the one host sync per step: needed for streaming and stop checks
        if step == 0:
            decode_start = synchronize(device)
            timings.prefill_s = decode_start - start
        else:
            timings.decode_tokens += len(active)
        for row in list(active):
            token = sampled[row]
            if token in stops:
                results[row].stop_token = token
                active.remove(row)
                continue
            results[row].token_ids.append(token)
            if on_token is not None:
                on_token(row, token)
        if not active or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits, cache = backend.forward(next_tokens[:, None], next_positions, mask, cache)
        next_positions = next_positions + 1
        next_tokens = sampler(logits[:, -1])
    timings.decode_s = synchronize(device) - decode_start
    return results
