"""quantkit's one-row CPU kernels (quantkit.native) against fp64 products, and their swap into models."""
from __future__ import annotations

import pytest
import torch

from quantkit import native
from quantkit.decode_linear import DecodeLinear, use_decode_kernels

pytestmark = pytest.mark.skipif(not native.available(), reason="needs x86-64 Linux with AVX512-BF16 and a C compiler")


def random_gptq(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qweight [K/8, N], qzeros [G, N/8] (every nibble value, 15 included) and fp16 scales [G, N]."""
    generator = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    words = lambda *shape: torch.randint(-2**31, 2**31, shape, dtype=torch.int64, generator=generator).to(torch.int32)
    scales = (torch.rand(groups, n, generator=generator) * 0.02 + 1e-3).half()
    return words(k // 8, n), words(groups, n // 8), scales


def dequantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [N, K] in fp64 from the classic GPTQ definition (zeros stored minus one), written out here independently."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    codes = torch.stack([(qweight >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(k, n)
    zeros = (torch.stack([(qzeros >> (4 * i)) & 0xF for i in range(8)], dim=2).reshape(len(qzeros), n) + 1) & 0xF
    group = torch.arange(k) // (k // len(scales))
    return ((codes - zeros[group]).double() * scales.double()[group]).t()


def assert_rounded_product(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """`out` is x @ weight^T + bias rounded to bf16: within half a bf16 ulp (2^-8 relative at most) plus the fp32
    summation's rounding, bounded by 2^-20 of the sum of |terms|."""
    exact = x.double() @ weight.t() + bias.double()
    magnitude = x.double().abs() @ weight.abs().t() + bias.double().abs()
    error = (out.double() - exact).abs()
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert (error <= 2**-8 * exact.abs() + 2**-20 * magnitude).all(), error.max()


@pytest.mark.parametrize("n, k, group", [(3072, 1024, 128), (4104, 256, 32), (520, 384, 64),
                                         (264, 1024, -1), (1000, 4096, 256)])
def test_int4_product_is_the_rounded_dequantized_product(n, k, group):
    qweight, qzeros, scales = random_gptq(n, k, group, seed=n + k)
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    bias = torch.randn(n).float()
    out = native.int4_linear(x, native.pack_gptq(qweight, qzeros, scales, group), bias)
    assert_rounded_product(out[0], x[0], dequantized(qweight, qzeros, scales), bias)


def test_int4_reads_the_zero_point_plus_one():
    """A zero stored as 7 is 8 in the classic format: off by one, every output moves by scale * sum(x)."""
    qweight, qzeros, scales = random_gptq(256, 256, 128, seed=3)
    qzeros = torch.full_like(qzeros, 0x77777777)  # every stored zero 7
    x = torch.ones(1, 256).bfloat16()
    out = native.int4_linear(x, native.pack_gptq(qweight, qzeros, scales, 128), None)
    assert_rounded_product(out, x, dequantized(qweight, qzeros, scales), torch.zeros(256))
    shifted = dequantized(qweight, qzeros, scales) + scales.double().repeat_interleave(128, 0).t()
    assert ((out.double() - x.double() @ shifted.t()).abs() > 0.05).all()


@pytest.mark.parametrize("n, k", [(50688, 1024), (4096 + 3, 4096), (7, 32)])
def test_bf16_product_is_the_rounded_product(n, k):
    generator = torch.Generator().manual_seed(n)
    weight = torch.randn(n, k, generator=generator).bfloat16()
    x, bias = torch.randn(1, k, generator=generator).bfloat16(), torch.randn(n, generator=generator)
    assert_rounded_product(native.bf16_linear(x, weight, bias), x, weight.double(), bias)


def test_decode_linear_takes_one_row_and_leaves_the_rest_to_the_layer():
    linear = torch.nn.Linear(64, 96).bfloat16()
    model = torch.nn.Sequential(linear, torch.nn.Linear(64, 8).float())  # the fp32 layer is not taken
    assert use_decode_kernels(model) == 1 and isinstance(model[0], DecodeLinear) and model[1].weight.dtype == torch.float32
    calls = []
    product = model[0].product
    model[0].product = lambda x: calls.append(x.shape) or product(x)
    one, many = torch.randn(1, 1, 64).bfloat16(), torch.randn(2, 3, 64).bfloat16()
    assert torch.equal(model[0](many), linear(many)) and calls == []  # the layer's own kernel
    assert_rounded_product(model[0](one)[0], one[0], linear.weight.double(), linear.bias.float())
    assert calls == [(1, 1, 64)]


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QUANTKIT_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert not native.available()
        assert use_decode_kernels(torch.nn.Sequential(torch.nn.Linear(64, 96).bfloat16())) == 0
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.available()
