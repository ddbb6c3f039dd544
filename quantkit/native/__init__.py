"""quantkit's own CPU kernels for a batch-1 decode step (gemv.c: bf16 and GPTQ int4 products of one row).

Compiled on first use with the system C compiler into the cache folder (about a second), only where the CPU
has AVX512-BF16; elsewhere `available()` is False and the backends keep torch's and gptqmodel's kernels.
QUANTKIT_NATIVE=0 turns them off (for side-by-side measurements).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from quantkit.paths import cache_dir

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS_NEEDED = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
MAX_GROUPS = 512  # gemv.c's limit on K / group
# The input (within a 128-input unit) whose code sits in the low nibble of each of the unit's 64 bytes (gemv.c's
# layout: byte 16*L + i holds 8*L + i for i < 8, 32 + 8*L + i - 8 for i >= 8; the high nibble holds that + 64).
UNIT_LOW = torch.tensor([8 * (b // 16) + b % 16 + (24 if b % 16 >= 8 else 0) for b in range(64)])


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def available() -> bool:
    """True where the kernels can run here: x86-64 Linux with AVX512-BF16, a C compiler, not turned off."""
    return library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if (os.environ.get("QUANTKIT_NATIVE", "1") == "0" or platform.machine() != "x86_64" or compiler is None
            or not CPU_FLAGS_NEEDED <= cpu_flags()):
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"gemv-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True)
            os.replace(built, target)  # atomic: a concurrent first use loads a complete file
    lib = ctypes.CDLL(str(target))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.qk_bf16_gemv.argtypes = [pointer, pointer, integer, integer, pointer, pointer]
    lib.qk_int4_gemv.argtypes = [pointer, pointer, pointer, pointer, integer, integer, integer, pointer, pointer]
    return lib


def one_row(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: one bf16 row on the CPU."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T + bias (fp32 or None) for one bf16 row x; weight bf16, contiguous, K % 32 == 0."""
    x = x.contiguous()
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    library().qk_bf16_gemv(x.data_ptr(), weight.data_ptr(), n, k, _address(bias), out.data_ptr())
    return out


@dataclasses.dataclass(frozen=True)
class PackedInt4:
    """A 4-bit weight in gemv.c's layout: codes [N, K/2] uint8, scales [N, G] fp32, zeros [N, G] uint8."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit values packed eight to an int32 along `dim` (lowest nibble first), as uint8, unpacked along it."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [rows, 8, cols]
        return values.reshape(-1, packed.shape[1]).to(torch.uint8)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF  # [rows, cols, 8]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> PackedInt4:
    """gemv.c's layout from a 4-bit GPTQ checkpoint's tensors (the classic `gptq` format: qweight [K/8, N] packed
    along K, qzeros [G, N/8] packed along N and stored minus one, scales [G, N])."""
    codes = unpack_int32(qweight, dim=0).t()  # [N, K]
    n, k = codes.shape
    group = k if group == -1 else group
    units = codes.reshape(n, k // 128, 128)
    packed = (units[:, :, UNIT_LOW] | (units[:, :, UNIT_LOW + 64] << 4)).reshape(n, k // 2).contiguous()
    zeros = ((unpack_int32(qzeros, dim=1)[:, :n].to(torch.int32) + 1) & 0xF).to(torch.uint8)
    return PackedInt4(packed, scales.float().t().contiguous(), zeros.t().contiguous(), group)


def packable(in_features: int, out_features: int, group: int) -> bool:
    """Whether gemv.c's int4 product takes a layer of this shape and group size (-1: one group per row)."""
    group = in_features if group == -1 else group
    return (in_features % 128 == 0 and group % 32 == 0 and in_features % group == 0
            and in_features // group <= MAX_GROUPS and out_features % 8 == 0)


def int4_linear(x: torch.Tensor, weight: PackedInt4, bias: torch.Tensor | None) -> torch.Tensor:
    """x[..., K] @ dequantized(weight)^T + bias (fp32 or None) for one bf16 row x."""
    x = x.contiguous()
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    library().qk_int4_gemv(x.data_ptr(), weight.codes.data_ptr(), weight.scales.data_ptr(),
                           weight.zeros.data_ptr(), n, k, weight.group, _address(bias), out.data_ptr())
    return out
