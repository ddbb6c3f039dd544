"""quantkit's CPU decode kernels (quantkit.native) against fp64 products, and their swap into models."""
from __future__ import annotations

import pytest
import torch

from quantkit import native
from quantkit.decode_kernels import use_decode_kernels
from quantkit.decode_linear import DecodeLinear

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


@pytest.fixture(params=["avx512", "amx"])
def rows_kernel(request):
    """Products of a few rows on rows.c's AVX512-BF16 kernel, then on amx.c's tiles where AMX is granted."""
    if request.param == "amx" and not native.amx_available():
        pytest.skip("needs AMX-BF16 (and the OS's grant of tile state)")
    native.library().qk_set_amx(int(request.param == "amx"))
    yield request.param
    native.library().qk_set_amx(int(native.amx_available()))


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



@pytest.mark.parametrize("n, k, group, rows", [(3072, 1024, 128, 8), (512, 384, 32, 2), (1024, 1024, -1, 16),
                                               (4096, 4096, 256, 5), (256, 256, 128, 11)])
def test_int4_product_of_a_few_rows_is_the_rounded_dequantized_product(rows_kernel, n, k, group, rows):
    qweight, qzeros, scales = random_gptq(n, k, group, seed=n + rows)
    x = torch.randn(rows, 1, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    bias = torch.randn(n).float()
    weight = native.pack_gptq(qweight, qzeros, scales, group)
    assert native.takes_rows(x, n)
    out = native.int4_linear(x, weight, bias)
    assert_rounded_product(out[:, 0], x[:, 0], dequantized(qweight, qzeros, scales), bias)


@pytest.mark.parametrize("n, k, group, rows", [(512, 4096, 128, 401), (256, 1152, 96, 40), (1024, 4096, -1, 100),
                                               (3072, 1024, 32, 17)])
def test_int4_product_of_a_prefill_on_amx_is_the_rounded_dequantized_product(n, k, group, rows):
    """A prefill's rows on amx.c: passes of 6 chunks of 16 rows, panels of 12 chunks, input blocks of whole groups
    and 128-input units (4096 by 2048, 1152 with groups of 96 in one block), a last chunk padded with zero rows."""
    if not native.amx_available():
        pytest.skip("needs AMX-BF16 (and the OS's grant of tile state)")
    qweight, qzeros, scales = random_gptq(n, k, group, seed=n + rows)
    x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    bias = torch.randn(n).float()
    assert native.takes_rows(x, n, int4=True) and not native.takes_rows(x, n)  # bf16 prefills stay on oneDNN
    out = native.int4_linear(x, native.pack_gptq(qweight, qzeros, scales, group), bias)
    assert_rounded_product(out[0], x[0], dequantized(qweight, qzeros, scales), bias)


def test_int4_decode_linear_takes_a_small_batch_and_a_prefill_on_amx_only(rows_kernel):
    qweight, qzeros, scales = random_gptq(256, 256, 128, seed=5)
    weight = native.pack_gptq(qweight, qzeros, scales, 128)
    layer_calls = []
    linear = DecodeLinear(lambda x: layer_calls.append(x.shape) or x, weight, None)
    exact = dequantized(qweight, qzeros, scales)
    small, prefill = torch.randn(8, 1, 256).bfloat16(), torch.randn(1, 17, 256).bfloat16()
    if rows_kernel == "amx":
        assert_rounded_product(linear(prefill)[0], prefill[0], exact, torch.zeros(256))
        assert layer_calls == []
    else:  # rows.c takes up to 16 rows: gptqmodel's layer runs the prefill
        assert linear(prefill) is prefill and layer_calls == [(1, 17, 256)]
    assert_rounded_product(linear(small)[:, 0], small[:, 0], exact, torch.zeros(256))
    assert_rounded_product(linear(small[:1])[0], small[0], exact, torch.zeros(256))  # one row: gemv.c
    assert len(layer_calls) == (rows_kernel == "avx512")


@pytest.mark.parametrize("n, k", [(50688, 1024), (4096 + 3, 4096), (7, 32)])
def test_bf16_product_is_the_rounded_product(n, k):
    generator = torch.Generator().manual_seed(n)
    weight = torch.randn(n, k, generator=generator).bfloat16()
    x, bias = torch.randn(1, k, generator=generator).bfloat16(), torch.randn(n, generator=generator)
    assert_rounded_product(native.bf16_linear(x, weight, bias), x, weight.double(), bias)


@pytest.mark.parametrize("n, k, rows", [(50688, 1024, 8), (3072, 1024, 2), (1024, 4096, 16), (16, 32, 5),
                                        (4099, 256, 13)])
def test_bf16_product_of_a_few_rows_is_the_rounded_product(rows_kernel, n, k, rows):
    if rows_kernel == "amx" and n % 16:
        pytest.skip("amx.c takes weights of a multiple of 16 rows")
    generator = torch.Generator().manual_seed(n + rows)
    weight = torch.randn(n, k, generator=generator).bfloat16()
    x, bias = torch.randn(rows, 1, k, generator=generator).bfloat16(), torch.randn(n, generator=generator)
    assert native.takes_rows(x, n)
    assert_rounded_product(native.bf16_linear(x, weight, bias)[:, 0], x[:, 0], weight.double(), bias)


def test_decode_linear_takes_a_few_rows_and_leaves_the_rest_to_the_layer():
    linear = torch.nn.Linear(64, 96).bfloat16()
    model = torch.nn.Sequential(linear, torch.nn.Linear(64, 8).float())  # the fp32 layer is not taken
    assert use_decode_kernels(model) == 1 and isinstance(model[0], DecodeLinear) and model[1].weight.dtype == torch.float32
    calls = []
    product = native.bf16_linear
    one, few, many = torch.randn(1, 1, 64).bfloat16(), torch.randn(4, 1, 64).bfloat16(), torch.randn(2, 9, 64).bfloat16()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "bf16_linear", lambda x, *rest: calls.append(x.shape) or product(x, *rest))
        assert torch.equal(model[0](many), linear(many)) and calls == []  # 18 rows: the layer's own kernel
        assert_rounded_product(model[0](one)[0], one[0], linear.weight.double(), linear.bias.float())
        assert_rounded_product(model[0](few)[:, 0], few[:, 0], linear.weight.double(), linear.bias.float())
    assert calls == [(1, 1, 64), (4, 1, 64)]


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


def test_a_compiler_that_fails_leaves_the_library_kernels(monkeypatch, tmp_path):
    """A kernel build that fails (here a compiler that always does) warns in one line and turns the kernels off."""
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not compile"):
            assert not native.available()
        assert not list((tmp_path / "native").iterdir())  # nothing half-written left in the cache
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.available()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX's rotary embedding (rotate-half form over the last dim of cos) in fp64, written out here."""
    r = cos.shape[-1]
    half = r // 2
    x = x.double()
    turned = torch.cat([-x[..., half:r], x[..., :half]], dim=-1)
    return torch.cat([x[..., :r] * cos.double() + turned * sin.double(), x[..., r:]], dim=-1)


@pytest.mark.parametrize("rows, heads, head_dim, position", [(1, 16, 64, 37), (1, 4, 128, 0), (3, 8, 64, 300)])
def test_decode_attention_is_fp32_attention_over_the_cache(rows, heads, head_dim, position):
    """Each row's new k and v land at `position` (k rotated by the row's own angles, rounded to bf16), its masked keys
    get no weight, and its output is the fp64 attention of the bf16 q, k and v rounded to bf16: half an ulp plus the
    fp32 sums' rounding."""
    generator = torch.Generator().manual_seed(heads + position)
    rotary, capacity = head_dim // 4, position + 20
    qkv = torch.randn(rows, heads, 3, head_dim, generator=generator).bfloat16()
    keys = torch.randn(rows, heads, capacity, head_dim, generator=generator).bfloat16()
    values = torch.randn(rows, heads, capacity, head_dim, generator=generator).bfloat16()
    row_positions = torch.tensor([position - 5 * row for row in range(rows)])  # left padding shifts later rows
    angles = (row_positions[:, None] / 10000 ** (torch.arange(rotary // 2) * 2 / rotary)).repeat(1, 2)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()  # as transformers hands them to a bf16 model
    mask = torch.zeros(rows, position + 3, dtype=torch.bfloat16)  # wider than needed, as a cache's mask can be
    for row in range(rows):
        mask[row, row : position : 3] = torch.finfo(torch.bfloat16).min  # every third key masked, the new one kept
    out = native.decode_attention(qkv.flatten(1), cos, sin, keys, values, position, mask, head_dim**-0.5)

    query = rotated(qkv[:, :, 0], cos[:, None], sin[:, None]).bfloat16().double()
    assert torch.equal(keys[:, :, position], rotated(qkv[:, :, 1], cos[:, None], sin[:, None]).bfloat16())
    assert torch.equal(values[:, :, position], qkv[:, :, 2])
    k, v = keys[:, :, : position + 1].double(), values[:, :, : position + 1].double()
    scores = torch.einsum("mhd,mhtd->mht", query, k) * head_dim**-0.5 + mask[:, None, : position + 1].double()
    weights = scores.softmax(-1)
    exact = torch.einsum("mht,mhtd->mhd", weights, v)
    magnitude = torch.einsum("mht,mhtd->mhd", weights, v.abs())
    error = (out.view(rows, heads, head_dim).double() - exact).abs()
    assert (error <= 2**-8 * exact.abs() + 2**-16 * magnitude).all(), error.max()
    assert (weights * (mask[:, None, : position + 1] < 0)).max() == 0  # the mask is in force


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_layer_runs_the_decode_steps_of_every_layer(batch):
    """In a bf16 GPT-NeoX model layer.c runs every layer's decode steps (one row or a few left-padded rows)
    and decode_step the rest of the step (prefill stays with transformers), and teacher-forced decode logits stay as
    close to the fp32 model's as transformers' own bf16 layers keep them."""
    from quantkit.backends import open_backend
    from quantkit.decode_layer import DecodeLayer

    fused, plain, exact = (open_backend("tiny", dtype=dtype, device="cpu", native_kernels=kernels)
                           for dtype, kernels in (("bf16", True), ("bf16", False), ("fp32", False)))
    layers = fused.model.gpt_neox.layers
    assert all(isinstance(layer, DecodeLayer) for layer in layers) and len(layers) == fused.model.config.num_hidden_layers
    calls, model_calls = [], []
    run_layer, model_forward = native.decode_layer, fused.model.gpt_neox.forward
    ids = torch.randint(10, 7000, (batch, 72), generator=torch.Generator().manual_seed(0))
    padding = torch.arange(72)[None] < 6 * torch.arange(batch)[:, None]  # row r starts after 6r pad tokens
    mask = (~padding).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for name, backend in (("fused", fused), ("plain", plain), ("exact", exact)):
        steps = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "decode_layer", lambda *a: calls.append(a[6]) or run_layer(*a))
            patch.setattr(fused.model.gpt_neox, "forward", lambda *a, **k: model_calls.append(1) or model_forward(*a, **k))
            _, cache = backend.forward(ids[:, :40], positions[:, :40], mask[:, :40], backend.new_cache(batch))
            for t in range(40, 72):
                step, cache = backend.forward(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :t + 1], cache)
                steps.append(step[:, -1])
        logits[name] = torch.stack(steps)
        if name == "fused":
            assert calls == [t for t in range(40, 72) for _ in layers]
            assert len(model_calls) == 1  # the prefill only
    fused_error = (logits["fused"] - logits["exact"]).abs().mean()
    plain_error = (logits["plain"] - logits["exact"]).abs().mean()
    assert fused_error <= 1.25 * plain_error, (fused_error, plain_error)
