"""genai_config.json: what onnxruntime-genai reads beside an ONNX decoder to run it with its own generate loop.

onnxruntime-genai's model builder does not support GPT-NeoX, so no tool writes this file for these models; the
fields follow its configuration reference. The graph contract (onnx_graph.py) is a plain decoder: KV cache in and
out as past_key_values.{i}.key/value -> present.{i}.key/value, [batch, heads, past, head_size], so the config names
the "llama" type, onnxruntime-genai's generic decoder-only model. Rotary embeddings, the parallel residual and fp32
attention are inside the graph; genai only feeds ids, mask, positions and the cache. Search defaults are greedy.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from quantkit.chat import stop_token_ids

GENAI_CONFIG = "genai_config.json"
MODEL_TYPE = "llama"
PAST_NAMES = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT_NAMES = ("present.%d.key", "present.%d.value")


def genai_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, filename: str = "model.onnx") -> dict:
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    context = config.max_position_embeddings
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": stop_token_ids(tokenizer),
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "num_hidden_layers": layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_NAMES[0],
                    "past_value_names": PAST_NAMES[1],
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_NAMES[0],
                    "present_value_names": PRESENT_NAMES[1],
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "early_stopping": True,
            "past_present_share_buffer": False,
        },
    }


def write_genai_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(config, tokenizer), indent=2) + "\n")
