"""How export and quantization cost grow with model size (issue 6), on CPU; a script, not a timed test.

Every export runs alone in a fresh process (quantkit.report.run_isolated), which reports its own peak RSS; wall
time is measured around it (process start and imports included). Random-weight StableLM shapes:
  tiny (3.7M, trained), stablelm-200m, stablelm-3b:layers=4 (~1.2B: the 3B width, 4 of its 16 layers), stablelm-3b.
ONNX: the fp16 export without validation (validation is a run of the model, which the recipes time separately).
GPTQ: 4-bit, group 128, act-order off, `--calib-samples` x `--calib-seqlen` tokens of wikitext2-valid; at the 3B
width with 2 and 4 layers, so the time per layer shows. The export's phase timings come from its manifest:
gptqmodel's quantize() and the held-out perplexity check that every GPTQ export runs.

    python -m benchmarks.scaling [--onnx tiny stablelm-200m ...] [--gptq tiny ...] [--calib-samples 16]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantkit.machine import machine_info, machine_line
from quantkit.report import run_isolated

RESULTS = Path(__file__).parent / "results"
NAME = "scaling"


def shape(spec: str) -> dict:
    """Parameters, layers and width of a spec, from its config alone (meta device)."""
    from quantkit.export.onnx_graph import meta_model
    from quantkit.sources import load_model_config

    config = load_model_config(spec)
    params = sum(p.numel() for p in meta_model(config, torch.float16).parameters())
    return {"params": params, "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def onnx_export(spec: str, out: Path, threads: int) -> dict:
    """In the child: the fp16 ONNX export of `spec`."""
    from quantkit.export.onnx import OnnxOptions, export_onnx

    torch.set_num_threads(threads)
    export_onnx(spec, out, OnnxOptions(dtype="fp16", device="cpu", validate=False), overwrite=True)
    return json.loads((out / "quantkit.json").read_text())["metrics"]


def gptq_export(spec: str, out: Path, samples: int, seqlen: int, threads: int) -> dict:
    """In the child: the GPTQ export of `spec`."""
    from quantkit.export.gptq import GptqOptions, export_gptq

    torch.set_num_threads(threads)
    options = GptqOptions(calib=("wikitext2-valid",), calib_samples=samples, calib_seqlen=seqlen, device="cpu")
    export_gptq(spec, out, options, overwrite=True)
    return json.loads((out / "quantkit.json").read_text())["metrics"]


def measured(kind: str, spec: str, function, *args) -> dict:
    start = time.perf_counter()
    metrics, peak = run_isolated(function, *args)
    row = {"kind": kind, "model": spec, **shape(spec), "wall_s": round(time.perf_counter() - start, 1),
           "peak_rss_bytes": peak, "metrics": metrics}
    print(f"{kind} {spec}: {row['wall_s']} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    return row


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = ["# Export and quantization cost vs model size (CPU)\n", f"Machine: {machine_line(report['machine'])}; "
             f"{settings['threads']} threads. Each export alone in a fresh process; random-weight StableLM shapes "
             "(tiny is the trained tiny model).\n",
             "## fp16 ONNX export (no validation)\n",
             "| model | params (M) | layers x width | wall s | peak RSS GiB | fp16 weights GiB | RSS / weights |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in (r for r in report["rows"] if r["kind"] == "onnx"):
        weights = r["metrics"]["weight_bytes"]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} | {r['layers']} x {r['hidden']} | {r['wall_s']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {weights / 2**30:.2f} | {r['peak_rss_bytes'] / weights:.2f}x |")
    lines += ["", f"## GPTQ 4-bit export (group 128, {settings['calib_samples']} x {settings['calib_seqlen']} "
              "calibration tokens of wikitext2-valid)\n",
              "| model | params (M) | layers x width | wall s | quantize() s | quantize s / layer | quality check s "
              "| peak RSS GiB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in (r for r in report["rows"] if r["kind"] == "gptq"):
        t = r["metrics"]["timings_s"]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} | {r['layers']} x {r['hidden']} | {r['wall_s']} | "
                     f"{t['gptqmodel_quantize']} | {t['gptqmodel_quantize'] / r['layers']:.1f} | {t['measure']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", nargs="*", default=["tiny", "stablelm-200m", "stablelm-3b:layers=4", "stablelm-3b"])
    parser.add_argument("--gptq", nargs="*", default=["tiny", "stablelm-200m", "stablelm-3b:layers=2",
                                                      "stablelm-3b:layers=4"])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaling-", dir=args.work))
    rows = []
    try:
        for i, spec in enumerate(args.onnx):
            rows.append(measured("onnx", spec, onnx_export, spec, work / f"onnx-{i}", args.threads))
            shutil.rmtree(work / f"onnx-{i}")
        for i, spec in enumerate(args.gptq):
            rows.append(measured("gptq", spec, gptq_export, spec, work / f"gptq-{i}", args.calib_samples,
                                 args.calib_seqlen, args.threads))
            shutil.rmtree(work / f"gptq-{i}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "work"},
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(report))
    print(f"wrote {RESULTS / NAME}.md")


if __name__ == "__main__":
    main()
