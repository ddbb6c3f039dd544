"""ONNX export cost and ONNX Runtime decode speed (issue 4); not a timed test.

Export: wall time and peak RSS of `export_onnx` (fp16 and fp32, no validation), each in a fresh subprocess that
reports its own ru_maxrss, so one export's memory never hides another's. Target for the full stablelm-3b shape:
peak RSS <= 1.3x the fp16 weight bytes (run it by hand with --with-3b: 7.3 GB written, minutes).

Decode: tokens/s at batch 1 of quantkit's runner on the ONNX Runtime backend (fp32 artifact, and the fp16 one,
which ORT's CPU provider computes in fp32) against transformers' `model.generate` on the same weights in fp32.
Timed as in runner_vs_generate: an N-token call minus a 1-token call, median of repeats, interleaved.
CPU targets: ORT >= 2.5x generate on tiny, >= 1.2x on stablelm-200m.

    python -m benchmarks.onnx_bench [--models tiny stablelm-200m] [--with-3b] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.runner_vs_generate import RESULTS, decode_tok_s, generate_call, runner_call
from quantkit.backends.onnxrt import OnnxBackend
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import render_prompt
from quantkit.machine import machine_info, machine_line
from quantkit.sources import load_model

TARGETS = {"tiny": 2.5, "stablelm-200m": 1.2}


def child_export(spec: str, dtype: str, out: str) -> None:
    """Runs in the subprocess: one export, then its own wall time and peak RSS as a JSON line."""
    from quantkit.export.onnx import OnnxOptions, export_onnx

    start = time.perf_counter()
    export_onnx(spec, Path(out), OnnxOptions(dtype=dtype, device="cpu", validate=False))
    manifest = json.loads((Path(out) / "quantkit.json").read_text())
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weight_bytes": manifest["metrics"]["weight_bytes"],
    }))


def export_row(spec: str, dtype: str, out: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.onnx_bench", "--child-export", spec, dtype, str(out),
               "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {spec} ({dtype}) failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"model": spec, "dtype": dtype, **figures}
    row["rss_over_weights"] = row["peak_rss_bytes"] / row["weight_bytes"]
    print(f"export {spec} {dtype}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"= {row['rss_over_weights']:.2f}x weights ({row['weight_bytes'] / 2**30:.2f} GiB)", flush=True)
    return row


def median_tok_s(call, backend, prompts, new_tokens: int, repeats: int) -> float:
    return statistics.median(decode_tok_s(call, backend, prompts, new_tokens) for _ in range(repeats))


def decode_row(spec: str, artifacts: dict[str, Path], new_tokens: int, repeats: int) -> dict:
    model, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
    reference = TorchBackend(model, tokenizer, name="torch-fp32")
    runtimes = {dtype: OnnxBackend(folder, device="cpu") for dtype, folder in artifacts.items()}
    prompts = [tokenizer(render_prompt("Explain the assert statement."))["input_ids"]]
    generate_call(reference, prompts, 4)  # warm-up
    for backend in runtimes.values():
        runner_call(backend, prompts, 4)
    row = {"model": spec, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "batch": 1}
    row["generate_tok_s"] = median_tok_s(generate_call, reference, prompts, new_tokens, repeats)
    for dtype, backend in runtimes.items():
        row[f"onnx_{dtype}_tok_s"] = median_tok_s(runner_call, backend, prompts, new_tokens, repeats)
    row["speedup"] = row["onnx_fp32_tok_s"] / row["generate_tok_s"]
    row["target"] = TARGETS.get(spec)
    print(f"decode {spec}: ORT fp32 {row['onnx_fp32_tok_s']:.1f}, ORT fp16 {row['onnx_fp16_tok_s']:.1f}, "
          f"generate {row['generate_tok_s']:.1f} tok/s -> {row['speedup']:.2f}x", flush=True)
    return row


def write_tables(exports: list[dict], decodes: list[dict], info: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx_bench.json").write_text(
        json.dumps({"machine": info, "exports": exports, "decode": decodes}, indent=2) + "\n")
    lines = [
        "# ONNX export and ONNX Runtime decode (CPU)\n",
        f"Machine: {machine_line(info)}\n",
        "## Export (no validation; one subprocess each)\n",
        "| model | dtype | wall s | peak RSS GiB | weights GiB | RSS / weights |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['dtype']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['weight_bytes'] / 2**30:.2f} | {r['rss_over_weights']:.2f}x |" for r in exports]
    lines += [
        "\n## Decode, batch 1, greedy (quantkit runner on ORT vs transformers generate, same weights)\n",
        "| model | params (M) | ORT fp32 tok/s | ORT fp16 tok/s | generate fp32 tok/s | ORT fp32 / generate | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['params_m']} | {r['onnx_fp32_tok_s']:.1f} | {r['onnx_fp16_tok_s']:.1f} | "
              f"{r['generate_tok_s']:.1f} | {r['speedup']:.2f}x | "
              f"{'>= %.1fx' % r['target'] if r['target'] else '-'} |" for r in decodes]
    (RESULTS / "onnx_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny", "stablelm-200m"])
    parser.add_argument("--with-3b", action="store_true", help="also export the full stablelm-3b shape (fp16)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the artifacts (default: a temporary one)")
    parser.add_argument("--child-export", nargs=3, metavar=("SPEC", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_export:
        child_export(*args.child_export)
        return
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-", dir=args.work))
    try:
        exports, decodes = [], []
        for spec in args.models:
            artifacts = {dtype: work / f"{spec}-{dtype}" for dtype in ("fp16", "fp32")}
            exports += [export_row(spec, dtype, folder, args.threads) for dtype, folder in artifacts.items()]
            decodes.append(decode_row(spec, artifacts, args.new_tokens, args.repeats))
            for folder in artifacts.values():
                shutil.rmtree(folder)
        if args.with_3b:
            exports.append(export_row("stablelm-3b", "fp16", work / "stablelm-3b-fp16", args.threads))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_tables(exports, decodes, machine_info())


if __name__ == "__main__":
    main()
