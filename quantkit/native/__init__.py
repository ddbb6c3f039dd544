"""quantkit's own CPU kernels for decode steps: gemv.c (bf16 and GPTQ int4 products of one row), rows.c (the same
products of 2-16 rows, a small decode batch, with AVX512-BF16 dot products) and amx.c (those on AMX tiles, which
rows.c sends them to where the CPU has AMX-BF16), attention.c (GPT-NeoX attention of each row over the KV cache) and
layer.c (a whole GPT-NeoX layer of those rows on them).

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
import warnings
from pathlib import Path

import torch

from quantkit.paths import atomic_write, cache_dir

FOLDER = Path(__file__).parent
SOURCES = tuple(FOLDER / name for name in ("gemv.c", "rows.c", "attention.c", "layer.c", "amx.c"))
HEADERS = (FOLDER / "bf16.h", FOLDER / "int4.h")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16", "-fopenmp",
         "-shared", "-fPIC")
CPU_FLAGS_NEEDED = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
AMX_FLAGS = {"amx_tile", "amx_bf16"}
MAX_ROWS = 16  # rows of x rows.c, layer.c and amx.c's bf16 product take
MAX_GROUPS = 512  # int4.h's limit on K / group
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
    sources = b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(sources + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"kernels-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        build = lambda out: subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"],
                                           check=True, capture_output=True, text=True)
        try:
            atomic_write(target, build)  # a concurrent first use loads a complete file
        except subprocess.CalledProcessError as exc:
            reason = next(iter(exc.stderr.strip().splitlines()), f"exit status {exc.returncode}")
            warnings.warn(f"quantkit's CPU kernels did not compile ({compiler}: {reason}); using the libraries' "
                          "kernels", stacklevel=2)
            return None
    lib = ctypes.CDLL(str(target))
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.qk_bf16_gemv.argtypes = [pointer, pointer, integer, integer, pointer, pointer]
    lib.qk_int4_gemv.argtypes = [pointer, pointer, pointer, pointer, integer, integer, integer, pointer, pointer]
    lib.qk_decode_attention.argtypes = [pointer, integer, pointer, pointer, integer, integer, integer, pointer, pointer,
                                        integer, integer, pointer, integer, real, pointer]
    lib.qk_int4_gemm.argtypes = [pointer, integer, pointer, pointer, pointer, integer, integer, integer, pointer,
                                 pointer]
    lib.qk_bf16_gemm.argtypes = [pointer, integer, pointer, integer, integer, pointer, pointer]
    lib.qk_set_amx.argtypes = [integer]
    lib.qk_set_amx(int(amx_granted(lib)))
    lib.qk_amx_on.restype = integer
    lib.qk_decode_layer.argtypes = [ctypes.POINTER(Layer), pointer, integer, pointer, pointer, pointer, pointer, integer,
                                    integer, pointer, integer]
    return lib


def amx_granted(lib: ctypes.CDLL) -> bool:
    """Whether the CPU has AMX-BF16 and the OS grants this process tile state."""
    return AMX_FLAGS <= cpu_flags() and lib.qk_amx_enable() == 0


@functools.cache
def amx_available() -> bool:
    """Whether amx.c runs here: the kernels load and AMX is granted."""
    return available() and amx_granted(library())


def rows_on_amx() -> bool:
    """Whether products of 2 to MAX_ROWS rows run on amx.c now (where AMX is granted, unless switched off)."""
    return available() and bool(library().qk_amx_on())


def takes_rows(x: torch.Tensor, out_features: int, int4: bool = False) -> bool:
    """Whether the products take `x` for a weight of `out_features` rows: bf16 rows on the CPU, one (gemv.c) or up
    to MAX_ROWS (rows.c; on amx.c where AMX runs, which needs out_features a multiple of 16), and for an int4 weight
    any number on amx.c (a prefill: there gptqmodel's CPU kernel is slower; bf16 prefills stay on oneDNN)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        return True
    if rows_on_amx():
        return out_features % 16 == 0 and (rows <= MAX_ROWS or int4)
    return rows <= MAX_ROWS


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T + bias (fp32 or None) for bf16 rows x that `takes_rows` accepts; weight bf16,
    contiguous, K % 32 == 0."""
    x = x.contiguous()
    n, k = weight.shape
    rows = x.numel() // k
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if rows == 1:
        library().qk_bf16_gemv(x.data_ptr(), weight.data_ptr(), n, k, _address(bias), out.data_ptr())
    else:
        library().qk_bf16_gemm(x.data_ptr(), rows, weight.data_ptr(), n, k, _address(bias), out.data_ptr())
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
    """x[..., K] @ dequantized(weight)^T + bias (fp32 or None) for bf16 rows x that `takes_rows` accepts."""
    x = x.contiguous()
    n, k = weight.shape
    rows = x.numel() // k
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if rows == 1:
        library().qk_int4_gemv(x.data_ptr(), weight.codes.data_ptr(), weight.scales.data_ptr(),
                               weight.zeros.data_ptr(), n, k, weight.group, _address(bias), out.data_ptr())
    else:
        library().qk_int4_gemm(x.data_ptr(), rows, weight.codes.data_ptr(), weight.scales.data_ptr(),
                                   weight.zeros.data_ptr(), n, k, weight.group, _address(bias), out.data_ptr())
    return out


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, position: int, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """GPT-NeoX attention of the M rows of a decode step, all bf16 and contiguous: qkv [M, heads * 3 * head_dim] (per
    head q, k, v); cos, sin [M, rotary dims]; keys, values the layer's [M, heads, capacity, head_dim] cache buffers,
    into which each row's rotated k and v are written at `position`; mask [M, >= position + 1] additive or None.
    Returns [M, heads * head_dim]."""
    rows, heads, capacity, head_dim = keys.shape
    out = torch.empty(rows, heads * head_dim, dtype=torch.bfloat16)
    library().qk_decode_attention(qkv.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), heads, head_dim,
                                  cos.shape[-1], keys.data_ptr(), values.data_ptr(), capacity, position,
                                  _address(mask), 0 if mask is None else mask.shape[-1], scaling, out.data_ptr())
    return out


def attention_fits(head_dim: int, rotary_dims: int) -> bool:
    """Whether attention.c takes heads of this size (a multiple of 32, at most 256) and this rotary width."""
    return head_dim % 32 == 0 and head_dim <= 256 and rotary_dims % 2 == 0 and rotary_dims <= head_dim


class Linear(ctypes.Structure):
    """layer.c's qk_linear: a bf16 weight [N, K] (scales NULL) or a PackedInt4, with an fp32 bias or NULL."""
    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out_features", ctypes.c_int), ("in_features", ctypes.c_int),
                ("group", ctypes.c_int)]


class Layer(ctypes.Structure):
    """layer.c's qk_layer: a GPT-NeoX layer's four linears, fp32 layer-norm parameters and sizes."""
    _fields_ = [("qkv", Linear), ("dense", Linear), ("fc1", Linear), ("fc2", Linear),
                ("ln1_weight", ctypes.c_void_p), ("ln1_bias", ctypes.c_void_p), ("ln2_weight", ctypes.c_void_p),
                ("ln2_bias", ctypes.c_void_p), ("hidden", ctypes.c_int), ("heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("rotary", ctypes.c_int), ("eps", ctypes.c_float),
                ("scaling", ctypes.c_float)]


def linear_struct(weight: torch.Tensor | PackedInt4, bias: torch.Tensor | None) -> Linear:
    """The qk_linear of a weight the products take (the tensors must outlive it)."""
    n, k = weight.shape
    if isinstance(weight, PackedInt4):
        return Linear(weight.codes.data_ptr(), weight.scales.data_ptr(), weight.zeros.data_ptr(), _address(bias),
                      n, k, weight.group)
    return Linear(weight.data_ptr(), None, None, _address(bias), n, k, 0)


def decode_layer(layer: Layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, position: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One GPT-NeoX layer (parallel residual) for the M bf16 rows of a decode step (hidden [M, 1, hidden_size]; M
    above 1 only with AMX and out_features multiples of 16): returns its output; each row's rotated k and v are
    written into the cache buffers at `position` (cos, sin, keys, values and mask as in decode_attention)."""
    out = hidden.clone(memory_format=torch.contiguous_format)  # the kernel writes the output over it
    library().qk_decode_layer(ctypes.byref(layer), out.data_ptr(), keys.shape[0], cos.data_ptr(), sin.data_ptr(),
                              keys.data_ptr(), values.data_ptr(), keys.shape[2], position, _address(mask),
                              0 if mask is None else mask.shape[-1])
    return out
