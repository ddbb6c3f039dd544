"""StableLM-Alpha architecture facts shared by the model sources and the tiny model's trainer."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import GPTNeoXConfig

STABLELM_TOKENIZER = "tokenizers/stablelm-tuned-alpha-7b"  # inside the shared data folder


@dataclass(frozen=True)
class RandomShape:
    """A StableLM-Alpha-shaped GPT-NeoX config that gets seeded random weights."""

    hidden: int
    layers: int
    heads: int
    vocab_rows: int

    def config(self, layers: int | None = None) -> GPTNeoXConfig:
        return GPTNeoXConfig(
            vocab_size=self.vocab_rows,
            hidden_size=self.hidden,
            num_hidden_layers=layers or self.layers,
            num_attention_heads=self.heads,
            intermediate_size=4 * self.hidden,
            rotary_pct=0.25,
            rotary_emb_base=10000,
            max_position_embeddings=4096,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            layer_norm_eps=1e-5,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=0,
        )
