"""The narrow interface between the runner and a runtime: one forward step over a backend-owned KV cache."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase


class Backend(Protocol):
    """A runtime that the shared runner drives. The loop, prompt, sampling and stop rule never live here."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_rows: int  # rows of the logits; rows at and past len(tokenizer) are padding
    device: str
    max_positions: int  # longest sequence (past + new tokens) the model supports
    decode_weight_bytes: int  # weight bytes one decode step reads (all weights but the embedding table)

    def new_cache(self, batch_size: int) -> Any:
        """An empty KV cache for `batch_size` rows."""

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        last_only: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        """fp32 logits [B, 1 or T, vocab_rows] for `input_ids` [B, T] after the cached tokens, and the new cache.

        `attention_mask` [B, past + T] has 0 for left padding; `position_ids` [B, T] count real tokens only.
        """
