"""Decode speed of the int4 ONNX export (issue 7) against the fp16/fp32 ONNX exports, the GPTQ PyTorch backend and
the fp32 PyTorch reference, side by side on CPU; not a timed test.

Each model is quantized with round-to-nearest (same packed layout as GPTQ; speed does not depend on how the
integers were chosen) and exported as int4 ONNX three ways (fp16 graph; fp32 graph, the CPU provider's native
dtype; fp32 graph with accuracy_level 4, int8 activations) and as plain fp16 and fp32 ONNX; every backend is timed through quantkit's runner at batch 1 as in
runner_vs_generate (an N-token call minus a 1-token call; median of repeats, interleaved across backends).
Target at ~200M: int4 ONNX >= 1.8x fp32 ONNX decode tokens/s (the best int4 variant counts).

    python -m benchmarks.onnx_int4_bench [--models stablelm-200m stablelm-3b:layers=2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.runner_vs_generate import RESULTS, decode_tok_s, runner_call
from quantkit.backends.base import Backend
from quantkit.backends.gptq import open_gptq
from quantkit.backends.onnxrt import OnnxBackend
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import render_prompt
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.export.onnx import OnnxOptions, export_onnx
from quantkit.export.onnx_int4 import Int4Options, export_onnx_int4
from quantkit.machine import machine_info, machine_line
from quantkit.sources import load_model

TARGET = {"model": "stablelm-200m", "ratio": 1.8}  # int4 ONNX / fp32 ONNX decode
NAME = "onnx_int4_bench"


INT4 = {"int4-fp16": Int4Options(dtype="fp16"), "int4-fp32": Int4Options(dtype="fp32"),
        "int4-fp32-a8": Int4Options(dtype="fp32", accuracy_level=4)}


def build(spec: str, work: Path) -> dict[str, Path]:
    """The GPTQ (RTN) artifact, the int4 ONNX variants and the fp16 and fp32 ONNX artifacts of `spec`."""
    folders = {name: work / name for name in ("gptq", *INT4, "onnx-fp16", "onnx-fp32")}
    export_gptq(spec, folders["gptq"], GptqOptions(method="rtn", device="cpu"))
    for name, options in INT4.items():
        export_onnx_int4(str(folders["gptq"]), folders[name], options)
    for dtype in ("fp16", "fp32"):
        export_onnx(spec, folders[f"onnx-{dtype}"], OnnxOptions(dtype=dtype, device="cpu", validate=False))
    return folders


def open_all(spec: str, folders: dict[str, Path]) -> dict[str, Backend]:
    model, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
    backends: dict[str, Backend] = {name: OnnxBackend(folders[name], device="cpu")
                                    for name in (*INT4, "onnx-fp16", "onnx-fp32")}
    backends["gptq-torch"] = open_gptq(folders["gptq"], "cpu")
    backends["torch-fp32"] = TorchBackend(model, tokenizer, name="torch-fp32")
    return backends


def decode_row(spec: str, backends: dict[str, Backend], new_tokens: int, repeats: int) -> dict:
    prompts = [next(iter(backends.values())).tokenizer(render_prompt("Explain the assert statement."))["input_ids"]]
    for backend in backends.values():
        runner_call(backend, prompts, 4)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, backend in backends.items():
            samples[name].append(decode_tok_s(runner_call, backend, prompts, new_tokens))
    row = {"model": spec, "batch": 1, "tok_s": {name: statistics.median(v) for name, v in samples.items()},
           "decode_weight_bytes": {name: b.decode_weight_bytes for name, b in backends.items()}}
    row["int4_over_fp32_onnx"] = max(row["tok_s"][name] for name in INT4) / row["tok_s"]["onnx-fp32"]
    print(f"{spec}: " + ", ".join(f"{n} {v:.1f}" for n, v in row["tok_s"].items())
          + f" tok/s; best int4 / fp32 ONNX {row['int4_over_fp32_onnx']:.2f}x", flush=True)
    return row


def write_tables(rows: list[dict], info: dict, threads: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(
        json.dumps({"machine": info, "threads": threads, "target": TARGET, "rows": rows}, indent=2) + "\n")
    names = list(rows[0]["tok_s"])
    lines = [
        "# int4 ONNX (MatMulNBits) decode vs fp16/fp32 ONNX, GPTQ PyTorch and the fp32 reference (CPU)\n",
        "int4-fp16 / int4-fp32: the GPTQ weights in an fp16 / fp32 graph (exact GPTQ math); int4-fp32-a8: fp32 graph "
        "with MatMulNBits accuracy_level 4 (int8 activations, W4A8).\n",
        f"Machine: {machine_line(info)}; {threads} threads, shared with other jobs.\n",
        "Decode tokens/s, batch 1, greedy, quantkit runner (median of interleaved repeats).\n",
        "| model | " + " | ".join(names) + " | best int4 / fp32 ONNX | target |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    for r in rows:
        target = f">= {TARGET['ratio']}x" if r["model"] == TARGET["model"] else "-"
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['tok_s'][n]:.1f}" for n in names)
                     + f" | {r['int4_over_fp32_onnx']:.2f}x | {target} |")
    lines += ["\nDecode weight bytes (MiB) per step:\n", "| model | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    lines += [f"| {r['model']} | " + " | ".join(f"{r['decode_weight_bytes'][n] / 2**20:.0f}" for n in names) + " |"
              for r in rows]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["stablelm-200m", "stablelm-3b:layers=2"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the artifacts (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models:
        work = Path(tempfile.mkdtemp(prefix="onnx-int4-bench-", dir=args.work))
        try:
            rows.append(decode_row(spec, open_all(spec, build(spec, work)), args.new_tokens, args.repeats))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    write_tables(rows, machine_info(), args.threads)


if __name__ == "__main__":
    main()
