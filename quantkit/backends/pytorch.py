"""PyTorch backend: a transformers GPTNeoXForCausalLM (fp16 on CUDA is the reference; fp32/bf16/fp16 on CPU)."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from quantkit.decode_step import decode_step
from quantkit.kv_cache import preallocated_cache


def decode_weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of parameters and buffers (packed GPTQ tensors included) except the input embedding table,
    which a decode step reads one row of."""
    embedding = model.get_input_embeddings().weight
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t is not embedding}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class TorchBackend:
    """Runs a transformers causal LM over a preallocated KV cache; also serves GPTQ models loaded through
    transformers."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_rows = model.config.vocab_size
        self.device = str(model.device)
        self.max_positions = model.config.max_position_embeddings
        self.decode_weight_bytes = decode_weight_bytes(model)

    def new_cache(self, batch_size: int) -> Cache:
        return preallocated_cache(self.model.config)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        last_only: bool = True,
    ) -> tuple[torch.Tensor, Cache]:
        logits = decode_step(self.model, input_ids, position_ids, attention_mask, cache)
        if logits is not None:
            return logits.float(), cache
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits.float(), out.cache
