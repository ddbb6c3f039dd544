"""Speed of the 3B and 7B shapes on a CUDA GPU: PyTorch fp16 reference, ONNX fp16 (CUDA provider, IO binding),
GPTQ 4-bit (fastest kernel gptqmodel picks), decode at batch 1 and 8 and prefill at 512, with % of roofline.

Random fp16 weights (the `stablelm-3b` / `stablelm-7b` presets): kernel speed does not depend on the values, so the
GPTQ artifact is packed by round-to-nearest (no calibration). Quality is not measured here. Run by
`benchmarks/gpu.sh`; writes benchmarks/results/gpu-<gpu>.{json,md}.

    python -m benchmarks.gpu_bench [--shapes stablelm-3b stablelm-7b] [--work /tmp/quantkit-gpu]
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import time
from pathlib import Path

import torch

from quantkit.backends import open_backend
from quantkit.bench import BenchSettings, benchmark, folder_bytes
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.export.onnx import OnnxOptions, export_onnx
from quantkit.machine import machine_info, machine_line

RESULTS = Path(__file__).parent / "results"
SETTINGS = BenchSettings(prompt_lengths=(512,), decode_batches=(1, 8), decode_tokens=64, repeats=3)


def measure(label: str, spec: str, size_bytes: int | None = None) -> dict:
    backend = open_backend(spec, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    row = {"label": label, **benchmark(backend, SETTINGS)}
    row["size_bytes"] = size_bytes or backend.decode_weight_bytes
    print(f"  {label}: decode b1 {row['decode']['1']['median']:.1f} tok/s "
          f"({row['decode']['1']['roofline_pct']:.0f}% of roofline), b8 {row['decode']['8']['median']:.1f} tok/s, "
          f"prefill@512 {row['prefill'].get('512', {}).get('median', 0):.0f} tok/s", flush=True)
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    return row


def timed(what: str, action) -> float:
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    print(f"  {what}: {seconds:.0f} s", flush=True)
    return seconds


def bench_shape(shape: str, work: Path) -> list[dict]:
    print(f"{shape}:", flush=True)
    onnx_dir, gptq_dir = work / f"{shape}-onnx-fp16", work / f"{shape}-gptq-rtn4"
    rows = [measure("torch fp16 (reference)", shape)]
    export_s = timed("ONNX export", lambda: export_onnx(
        shape, onnx_dir, OnnxOptions(dtype="fp16", device="cuda", validate=False), overwrite=True))
    rows.append({**measure("ONNX fp16 (CUDA EP)", str(onnx_dir), folder_bytes(onnx_dir)), "export_s": export_s})
    pack_s = timed("GPTQ pack (RTN)", lambda: export_gptq(
        shape, gptq_dir, GptqOptions(method="rtn", bits=4, group_size=128, device="cuda"), overwrite=True))
    rows.append({**measure("GPTQ 4-bit g128", str(gptq_dir), folder_bytes(gptq_dir)), "export_s": pack_s})
    for row in rows:
        row["shape"] = shape
        row["speedup_b1"] = row["decode"]["1"]["median"] / rows[0]["decode"]["1"]["median"]
    return rows


def write(rows: list[dict], info: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "gpu-" + re.sub(r"[^a-z0-9]+", "-", (info["gpu"] or "none").lower()).strip("-")
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = [f"# {info['gpu']}: StableLM-Alpha shapes (random fp16 weights)", "", f"Machine: {machine_line(info)}", "",
             "Speed through the shared runner; median of 3 after a warm-up; roofline = measured copy bandwidth.", "",
             "| shape | artifact | decode tok/s b1 | decode tok/s b8 | speed-up b1 | % roofline b1 | prefill tok/s @512 "
             "| TTFT ms | size GiB | peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['decode']['1']['median']:.1f} | {r['decode']['8']['median']:.1f} | "
            f"{r['speedup_b1']:.2f}x | {r['decode']['1']['roofline_pct']:.0f}% | "
            f"{r['prefill'].get('512', {}).get('median', 0):.0f} | {r['ttft_ms']['median']:.1f} | "
            f"{r['size_bytes'] / 2**30:.2f} | {r['peak_memory_bytes'] / 2**30:.2f} |")
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["stablelm-3b", "stablelm-7b"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU: this benchmark needs one")
    rows = [row for shape in args.shapes for row in bench_shape(shape, args.work)]
    print(write(rows, machine_info()).read_text())


if __name__ == "__main__":
    main()
