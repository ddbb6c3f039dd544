"""Where a GPTQ backend decode step's time goes on CPU (torch.profiler): quantkit's layer kernel or the int4 linears,
attention and MLP of transformers' modules, the LM head, and per-step host work in the runner and transformers.

Each module class gets a profiler range (forward hooks); a share is the range's inclusive CPU time over the decode
wall time: whole layers on quantkit's layer.c (DecodeLayer, where it runs: then nothing inside a layer is split
out), int4 linears (quantkit's one-row product, or gptqmodel's TorchAtenLinear / its AVX512-BF16 subclass), the bf16
LM head, attention without its linears, the MLP's GELU, and what is left of the backend's forward (transformers'
model forward, or quantkit's decode_step where every layer runs on layer.c): embedding, final norm, masks and rotary
tables; then the runner's per-step work (sampling, host sync).

    python -m benchmarks.profile_gptq_decode GPTQ_FOLDER [--batch 1] [--new-tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear

from quantkit import native
from quantkit.backends.gptq import open_gptq
from quantkit.bench import filler_prompt
from quantkit.chat import Sampler
from quantkit.decode_linear import DecodeLinear
from quantkit.runner import generate



def add_ranges(backend) -> None:
    """Profiler ranges around quantkit's layer kernel, the int4 linears (by block part), attention, MLP, LM head and
    the backend's whole forward (transformers' model forward, or quantkit's decode_step)."""
    model = backend.model

    def wrap(module: torch.nn.Module, label: str) -> None:
        ranges: list = []
        module.register_forward_pre_hook(lambda *_: ranges.append(record_function(label).__enter__()))
        module.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None))

    for name, module in model.named_modules():
        kind = type(module).__name__
        inner = module.layer if isinstance(module, DecodeLinear) else module  # quantkit's one-row kernel wraps it
        if isinstance(inner, TorchAtenLinear) and not name.endswith(".layer"):  # TorchCpuAvx512Linear too
            wrap(module, "int4 linear (attention)" if ".attention." in name else "int4 linear (mlp)")
        elif kind in ("GPTNeoXAttention", "GPTNeoXMLP"):
            wrap(module, kind.removeprefix("GPTNeoX").lower())
    run_layer = native.decode_layer  # DecodeLayer's one-row steps (its other inputs run the modules above)

    def ranged_layer(*args):
        with record_function("layer kernel"):
            return run_layer(*args)

    native.decode_layer = ranged_layer
    wrap(model.get_output_embeddings(), "lm head")
    forward = backend.forward

    def ranged_forward(*args, **kwargs):
        with record_function("backend forward"):
            return forward(*args, **kwargs)

    backend.forward = ranged_forward


def breakdown(totals: dict[str, float], decode_s: float) -> dict[str, float]:
    """Seconds per part of the decode steps; the parts add up to the decode wall time."""
    layer_kernel = totals.get("layer kernel", 0.0)
    linear_attention, linear_mlp = (totals.get(f"int4 linear ({part})", 0.0) for part in ("attention", "mlp"))
    parts = {
        "quantkit layer kernel (whole layers)": layer_kernel,
        "int4 linears outside it": linear_attention + linear_mlp,
        "lm head (bf16 mm)": totals["lm head"],
        "attention without its linears": totals.get("attention", 0.0) - linear_attention,
        "mlp without its linears (GELU)": totals.get("mlp", 0.0) - linear_mlp,
    }
    rest = "rest of the forward (embedding, norms, rotary, masks, module calls)"
    parts[rest] = totals["backend forward"] - sum(parts.values())
    parts["runner per-step work outside the forward"] = decode_s - totals["backend forward"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = open_gptq(args.folder, "cpu")
    prompts = [filler_prompt(backend.tokenizer, 128)] * args.batch
    greedy = Sampler(vocab_limit=len(backend.tokenizer))
    generate(backend, prompts, 4, greedy, stop_ids=[])  # warm-up: the kernel repacks its weights on first use
    add_ranges(backend)
    prof = profile(activities=[ProfilerActivity.CPU])

    def start_after_prefill(row: int, token: int) -> None:  # the runner calls it first when the prefill is done
        if prof.profiler is None:
            prof.start()

    result = generate(backend, prompts, args.new_tokens, greedy, stop_ids=[], on_token=start_after_prefill)[0]
    prof.stop()
    decode_s, steps = result.timings.decode_s, args.new_tokens - 1
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    print(f"{args.folder} batch {args.batch}, {args.threads} threads: decode {steps * args.batch / decode_s:.1f} "
          f"tok/s under the profiler, {1000 * decode_s / steps:.2f} ms/step")
    for part, seconds in breakdown(totals, decode_s).items():
        print(f"  {part}: {1000 * seconds / steps:.2f} ms/step ({100 * seconds / decode_s:.0f} %)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
