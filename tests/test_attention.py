"""The "fp32" attention: scores and softmax in fp32 whatever the model dtype, on the CPU fused kernel and on the
explicit ops that CUDA and the ONNX graph run."""
from __future__ import annotations

import pytest
import torch

from quantkit.attention import explicit_fp32_attention, fp32_attention

PATHS = ["fused cpu", "explicit"]


def attend(path: str, query, key, value, mask, scaling):
    """[batch, heads, seq, head_dim] through one path."""
    if path == "explicit":
        return explicit_fp32_attention(query, key, value, mask, scaling)
    return fp32_attention(None, query, key, value, mask, scaling)[0].transpose(1, 2)


def reference(query, key, value, mask, scaling) -> torch.Tensor:
    """fp64 attention of the same (already rounded) inputs."""
    scores = query.double() @ key.double().transpose(2, 3) * scaling
    if mask is not None:
        scores = scores + mask.double()
    return scores.softmax(-1) @ value.double()


def padding_mask(batch: int, queries: int, keys: int, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask hiding the first `padded` keys of row 1, as left padding does."""
    mask = torch.zeros(batch, 1, queries, keys, dtype=dtype)
    mask[1, :, :, :padded] = torch.finfo(dtype).min
    return mask


@pytest.mark.parametrize("path", PATHS)
def test_fp16_scores_past_the_fp16_range_stay_finite_and_exact(path):
    generator = torch.Generator().manual_seed(0)
    query = (torch.randn(1, 2, 3, 64, generator=generator) * 80).half()
    key = (torch.randn(1, 2, 9, 64, generator=generator) * 80).half()
    value = torch.randn(1, 2, 9, 64, generator=generator).half()
    assert (query.double() @ key.double().transpose(2, 3)).abs().max() > torch.finfo(torch.float16).max
    out = attend(path, query, key, value, None, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(query, key, value, None, 1.0), rtol=2**-10, atol=2**-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_matches_fp64_attention_within_the_dtype_and_ignores_padding(path, dtype):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 4, shape, 32, generator=generator).to(dtype) for shape in (5, 40, 40))
    mask = padding_mask(2, 5, 40, padded=12, dtype=dtype)
    out = attend(path, query, key, value, mask, 32**-0.5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), reference(query, key, value, mask, 32**-0.5), rtol=2 * eps, atol=2 * eps)
    scrambled = value.clone()
    scrambled[1, :, :12] = 1e3  # what left padding holds must not reach the output
    torch.testing.assert_close(attend(path, query, key, scrambled, mask, 32**-0.5), out, rtol=0, atol=0)
