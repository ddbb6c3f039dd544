"""What quantization costs the committed tiny StableLM: GPTQ vs round-to-nearest at 4 and 3 bits and several
group sizes (per column too, the GPTQ paper's setting), and the int4 ONNX export with int8 activations (W4A8), on
the held-out split (a script, not a test).

Every variant is exported by quantkit's own exporters (GPTQ calibrated as the tiny recipes are: 64 chat-format
samples of 256 tokens from `tiny-train`) and scored against the fp32 model by the shared evaluator: held-out token
perplexity, its change, mean KL divergence and top-1 agreement on the same windows. Quality only: the figures do
not depend on the machine's load.

    python -m benchmarks.tiny_quality [--groups 128 32 -1] [--data tiny-heldout] [--stride 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from quantkit import native
from quantkit.backends import open_backend
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.export.onnx_int4 import Int4Options, export_onnx_int4
from quantkit.machine import machine_info, machine_line
from quantkit.report import EvalRequest, evaluate_backend

RESULTS = Path(__file__).parent / "results"
NAME = "tiny_quality"
REFERENCE = "tiny"
VARIANTS = {"rtn4": ("rtn", 4), "gptq4": ("gptq", 4), "rtn3": ("rtn", 3), "gptq3": ("gptq", 3)}


def window_kernel() -> str:
    """The kernel the GPTQ backend's 4-bit products of a scored window run on here (3-bit: gptqmodel's always)."""
    if native.amx_available():
        return "quantkit's amx.c, exact as at decode; 3-bit on gptqmodel's CPU kernel"
    return "gptqmodel's CPU kernel"


def gptq_options(method: str, bits: int, group_size: int) -> GptqOptions:
    return GptqOptions(method=method, bits=bits, group_size=group_size, calib=("tiny-train",), calib_samples=64,
                       calib_seqlen=256, device="cpu")


def group_label(group: int) -> str:
    return "per-column" if group == -1 else f"g{group}"


def export_variants(groups: list[int], work: Path) -> dict[str, Path]:
    """Every GPTQ/RTN variant at every group size, then the W4A8 ONNX export of the first 4-bit GPTQ one."""
    folders: dict[str, Path] = {}
    for group in groups:
        for name, (method, bits) in VARIANTS.items():
            folders[f"{name} {group_label(group)}"] = export_gptq(REFERENCE, work / f"{name}-{group_label(group)}",
                                                                   gptq_options(method, bits, group))
    first = group_label(groups[0])
    w4a8 = Int4Options(dtype="fp32", accuracy_level=4)
    folders[f"onnx-int4 w4a8 {first}"] = export_onnx_int4(str(folders[f"gptq4 {first}"]), work / "onnx-int4-w4a8",
                                                          w4a8)
    return folders


def score(spec: str, request: EvalRequest) -> dict:
    record = evaluate_backend(open_backend(spec, dtype="fp32", device="cpu"), request)
    reference = record["reference_perplexity"]["token_perplexity"]
    ppl = record["perplexity"]["token_perplexity"]
    return {"perplexity": ppl, "delta_pct": 100 * (ppl / reference - 1), "reference_perplexity": reference,
            "mean_kld": record["agreement"]["kl_mean"], "top1": record["agreement"]["top1_agreement"],
            "scored_tokens": record["perplexity"]["tokens"]}


def write_tables(rows: dict[str, dict], request: EvalRequest, info: dict, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(
        {"machine": info, "command": command, "data": request.data, "window": request.window,
         "stride": request.stride, "rows": rows}, indent=2) + "\n")
    first = next(iter(rows.values()))
    lines = [
        "# What quantization costs the committed tiny StableLM\n",
        f"Held-out `{request.data}`, window {request.window}, stride {request.stride}: "
        f"{first['scored_tokens']} scored tokens; fp32 reference perplexity {first['reference_perplexity']:.3f}. "
        "KL divergence and top-1 agreement vs the fp32 model on the first 16,384 scored tokens. GPTQ: 64 "
        "chat-format calibration samples x 256 tokens of `tiny-train`, symmetric, no act-order. GPTQ/RTN rows run "
        f"through the GPTQ backend as users run them (bf16 activations; 4-bit windows on {window_kernel()}); the "
        "W4A8 row through ONNX Runtime.\n",
        f"Machine: {machine_line(info)} (quality figures depend on it only through that kernel).\n",
        f"Made by: `{command}`\n",
        "| variant | perplexity | Δ% vs fp32 | mean KLD | top-1 agree |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f} | {r['mean_kld']:.5f} | "
              f"{100 * r['top1']:.2f}% |" for name, r in rows.items()]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="+", type=int, default=[128, 32, -1], help="group sizes (-1: per column)")
    parser.add_argument("--data", default="tiny-heldout")
    parser.add_argument("--stride", type=int, default=64)
    args = parser.parse_args()
    request = EvalRequest(data=args.data, reference=REFERENCE, window=256, stride=args.stride, dtype="fp32",
                          device="cpu")
    with tempfile.TemporaryDirectory(prefix="tiny-quality-") as work:
        rows = {}
        for name, folder in export_variants(args.groups, Path(work)).items():
            rows[name] = score(str(folder), request)
            print(f"{name}: perplexity {rows[name]['perplexity']:.3f} ({rows[name]['delta_pct']:+.2f} %), "
                  f"mean KLD {rows[name]['mean_kld']:.5f}", flush=True)
    command = "python -m benchmarks.tiny_quality " + " ".join(
        ["--groups", *map(str, args.groups), "--data", args.data, "--stride", str(args.stride)])
    write_tables(rows, request, machine_info(), command)


if __name__ == "__main__":
    main()
