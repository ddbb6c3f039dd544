"""The preallocated KV cache: the same keys and values as transformers' DynamicCache, without a copy per step."""
from __future__ import annotations

import torch
from transformers import DynamicCache, GPTNeoXConfig

from quantkit.kv_cache import BLOCK, preallocated_cache


def test_same_keys_and_values_as_dynamic_cache_across_growth():
    config = GPTNeoXConfig(num_hidden_layers=2)
    ours, theirs = preallocated_cache(config), DynamicCache()
    generator = torch.Generator().manual_seed(0)
    for tokens in (130, 1, 1, BLOCK, 3):  # the fourth update outgrows the first buffer
        for layer in range(2):
            k, v = (torch.randn(3, 4, tokens, 8, generator=generator).bfloat16() for _ in range(2))
            got, want = ours.update(k, v, layer), theirs.update(k, v, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert ours.get_seq_length() == theirs.get_seq_length()


def test_one_token_steps_write_in_place():
    cache = preallocated_cache(GPTNeoXConfig(num_hidden_layers=1))
    cache.update(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4), 0)
    buffer = cache.layers[0].key_buffer.data_ptr()
    for step in range(BLOCK):
        keys, _ = cache.update(torch.full((1, 2, 1, 4), step + 1.0), torch.zeros(1, 2, 1, 4), 0)
        assert keys.data_ptr() == buffer and keys.shape[-2] == 11 + step
    assert keys[0, 0, 10:, 0].tolist() == [float(s + 1) for s in range(BLOCK)]
    cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)  # full: one copy into a bigger buffer
    assert cache.layers[0].key_buffer.data_ptr() != buffer
