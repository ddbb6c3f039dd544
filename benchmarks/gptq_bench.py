"""GPTQ export cost and GPTQ decode speed on CPU (a script, not a timed test).

1. Quantize: wall time and peak RSS of `quantkit export --fmt gptq` for each model, each in a fresh process (so
   the peak is that export's), split into quantkit's total and gptqmodel's own `quantize()` call, from the
   manifest's phase timings.
2. Decode: tokens/s through `quantkit.runner.generate` (greedy, no stop tokens, fixed length; median of repeats
   after a warm-up) of a 4-bit artifact vs its fp32 and bf16 source, at the StableLM-3B width
   (stablelm-3b:layers=2: hidden 4096, 50688 vocab rows, random weights). The artifact is made with RTN: the
   kernels see the same layout and shapes as after GPTQ, and RTN needs no calibration time.

    python -m benchmarks.gptq_bench [--models tiny stablelm-200m] [--calib-samples 32]
                                    [--decode-model stablelm-3b:layers=2] [--batches 1 8]

The 3B shape at full depth is `--models stablelm-3b:layers=4` (or more layers; about 25 s of quantize per layer
and 2.5 GB of RAM on two CPU cores for 32x512 calibration tokens), or the real checkpoint
`--models path/to/stablelm-tuned-alpha-3b` on a GPU machine. Results: benchmarks/results/gptq_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
RESULT = "GPTQ_BENCH_RESULT "


def export_one(model: str, out: Path, method: str, samples: int, seqlen: int, threads: int) -> dict:
    """Run inside the child process: one export, its phase timings and this process's peak RSS."""
    torch.set_num_threads(threads)
    from quantkit.export.gptq import GptqOptions, export_gptq

    export_gptq(model, out, GptqOptions(method=method, calib_samples=samples, calib_seqlen=seqlen), overwrite=True)
    manifest = json.loads((out / "quantkit.json").read_text())
    return {
        "timings_s": manifest["metrics"]["timings_s"],
        "perplexity": manifest["metrics"]["perplexity"],
        "calibration": manifest["calibration"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "artifact_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def quantize_row(model: str, out: Path, method: str, samples: int, seqlen: int, threads: int) -> dict:
    """One export in a fresh process; wall time includes the process start and imports."""
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.gptq_bench", "--child", model, str(out), method, str(samples), str(seqlen),
         str(threads)],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    row = json.loads(child.stdout.rpartition(RESULT)[2])  # gptqmodel logs to stdout too
    timings = row["timings_s"]
    row.update(model=model, method=method, process_wall_s=round(time.perf_counter() - start, 1),
               gptqmodel_quantize_s=timings["gptqmodel_quantize"], quantkit_total_s=timings["total"])
    print(f"{model} {method}: process {row['process_wall_s']} s, export {timings['total']} s, gptqmodel quantize() "
          f"{timings['gptqmodel_quantize']} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return row


def decode_tok_s(backend, new_tokens: int, batch: int, repeats: int) -> float:
    from quantkit.bench import measure
    from quantkit.chat import Sampler, render_prompt
    from quantkit.runner import generate

    prompt = backend.tokenizer(render_prompt("Explain the assert statement."))["input_ids"]
    greedy = Sampler(vocab_limit=len(backend.tokenizer))
    figures = measure(lambda: generate(backend, [prompt] * batch, new_tokens, greedy, stop_ids=[])[0].timings,
                      repeats, lambda t: t.decode_tok_s)
    return figures["median"]


def decode_rows(model: str, artifact: Path, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from quantkit.backends import open_backend

    rows = []
    for label, spec, dtype in (("source fp32", model, "fp32"), ("source bf16", model, "bf16"),
                               ("gptq 4-bit", str(artifact), None)):
        backend = open_backend(spec, dtype=dtype, device="cpu")
        for batch in batches:
            tok_s = decode_tok_s(backend, new_tokens, batch, repeats)
            rows.append({"model": model, "variant": label, "backend": backend.name, "batch": batch,
                         "decode_tok_s": tok_s, "decode_weight_gib": backend.decode_weight_bytes / 2**30})
            print(f"{model} {label} batch {batch}: {tok_s:.2f} tok/s", flush=True)
        del backend
    return rows


def markdown(report: dict, line: str) -> str:
    lines = ["# GPTQ export cost and decode speed (CPU)\n", f"Machine: {line}\n",
             f"Quantize: {report['settings']['calib_samples']} calibration samples of up to "
             f"{report['settings']['calib_seqlen']} tokens, group 128, each export in a fresh process.\n",
             "| model | method | process wall s | quantkit export s | gptqmodel quantize() s | peak RSS GiB "
             "| ppl source | ppl artifact |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {r['process_wall_s']} | {r['quantkit_total_s']} | "
              f"{r['gptqmodel_quantize_s']} | {r['peak_rss_gib']:.2f} | "
              f"{r['perplexity']['source']['perplexity']:.2f} | {r['perplexity']['quantized']['perplexity']:.2f} |"
              for r in report["quantize"]]
    lines += ["", f"Decode through quantkit.runner.generate, greedy, {report['settings']['new_tokens']} new tokens, "
              "median of repeats:\n",
              "| model | variant | backend | batch | decode tok/s | weights read per step GiB |",
              "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['backend']} | {r['batch']} | {r['decode_tok_s']:.2f} | "
              f"{r['decode_weight_gib']:.2f} |" for r in report["decode"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "stablelm-200m"])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--decode-model", default="stablelm-3b:layers=2")
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from quantkit.machine import machine_info, machine_line

    with tempfile.TemporaryDirectory(prefix="gptq-bench-") as scratch:
        quantize = [quantize_row(model, Path(scratch) / f"q{i}", "gptq", args.calib_samples, args.calib_seqlen,
                                 args.threads) for i, model in enumerate(args.models)]
        artifact = Path(scratch) / "decode"
        quantize.append(quantize_row(args.decode_model, artifact, "rtn", args.calib_samples, args.calib_seqlen,
                                     args.threads))
        decode = decode_rows(args.decode_model, artifact, args.batches, args.new_tokens, args.repeats)
    info = machine_info()
    report = {"machine": info, "settings": vars(args), "quantize": quantize, "decode": decode}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gptq_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "gptq_bench.md").write_text(markdown(report, machine_line(info)))
    print(f"wrote {RESULTS / 'gptq_bench.md'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        model, out, method, samples, seqlen, threads = sys.argv[2:8]
        print(RESULT + json.dumps(export_one(model, Path(out), method, int(samples), int(seqlen), int(threads))))
    else:
        main()
