"""quantkit's runner and vLLM's CPU build on the same artifact folders, side by side, in one sitting (issue 14).

Per shape, quantkit's own exporters build the folders once (cached under --work): a dense fp16 safetensors folder,
its GPTQ 4-bit export (round-to-nearest: the same packed layout as GPTQ), the onnx-int4 exports of that (fp32
graph, exact; fp32 graph at accuracy level 4, W4A8; both validated by the exporter) and the fp32 ONNX export of
the dense folder. Then, in rounds, each engine path runs as one block in a fresh process, quantkit and vLLM
blocks alternating: TTFT on the chat prompt, prefill tok/s at 128 and 512 tokens (1-token calls), decode tok/s at
batch 1 and 8 after a 128-token prompt (an N-token call minus a 1-token call; greedy, no stop tokens), peak RSS,
and % of the copy-test roofline (decode weight bytes x steps/s / bandwidth; vLLM is read with the weight bytes
quantkit's backend counts for the same folder). Both engines are timed by the same code (vllm_worker.figures).
vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: its RSS is the block's, no busy-polling engine process),
without prefix caching, with a small CPU KV cache; both engines get the same thread count.

    python -m benchmarks.vllm_side_by_side [--quick] [--threads 2] [--rounds 2] [--work build/vllm-side-by-side]
        [--name vllm_side_by_side_epyc] [--notes NOTES.txt]   (a table per CPU; the sitting's notes, one per line)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.runner_vs_generate import RESULTS
from benchmarks.vllm_worker import figures

SHAPES = ("stablelm-200m", "stablelm-3b:layers=2")
PROJECT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = PROJECT / ".venv-vllm" / "bin" / "python"
NAME = "vllm_side_by_side"
# engine path -> (weight format, folder, dtype); quantkit's paths open with quantkit.backends, vLLM's with LLM(...).
QUANTKIT = {
    "gptq-bf16": ("gptq", "gptq", None),
    "gptq-bf16-library": ("gptq", "gptq", None),
    "onnx-int4-fp32": ("gptq", "onnx-int4-fp32", None),
    "onnx-int4-a4": ("gptq", "onnx-int4-a4", None),
    "torch-bf16": ("dense", "dense", "bf16"),
    "torch-bf16-library": ("dense", "dense", "bf16"),
    "torch-fp32": ("dense", "dense", "fp32"),
    "onnx-fp32": ("dense", "onnx-fp32", None),
}
# quantkit's batch-1 decode runs on its own CPU kernels where they run (quantkit.decode_linear); these paths run
# torch's and gptqmodel's kernels only, so the table shows what the kernels are worth.
LIBRARY_KERNELS = {"gptq-bf16-library", "torch-bf16-library"}
VLLM = {
    "vllm-gptq-bf16": ("gptq", "gptq", "bfloat16"),
    "vllm-gptq-fp16": ("gptq", "gptq", "float16"),
    "vllm-bf16": ("dense", "dense", "bfloat16"),
    "vllm-fp32": ("dense", "dense", "float32"),
}
SAME_BYTES = {"vllm-gptq-bf16": "gptq-bf16", "vllm-gptq-fp16": "gptq-bf16", "vllm-bf16": "torch-bf16",
              "vllm-fp32": "torch-fp32"}  # the quantkit path whose decode weight bytes a vLLM path reads
FIGURES = ("decode_1", "decode_8", "prefill_128", "prefill_512", "ttft_ms", "peak_rss_bytes")
ROOFLINE_TARGET_PCT = 50


def slug(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "")


def build(spec: str, work: Path) -> dict[str, Path]:
    """The artifact folders of `spec` under `work` (each written only if it is not there yet)."""
    import torch

    from quantkit.export.gptq import GptqOptions, export_gptq
    from quantkit.export.onnx import OnnxOptions, export_onnx
    from quantkit.export.onnx_int4 import Int4Options, export_onnx_int4
    from quantkit.sources import load_model

    folders = {name: work / name for name in ("dense", "gptq", "onnx-int4-fp32", "onnx-int4-a4", "onnx-fp32")}
    steps = {
        "dense": lambda out: save_dense(*load_model(spec, dtype=torch.float16, device="cpu"), out),
        "gptq": lambda out: export_gptq(str(folders["dense"]), out, GptqOptions(method="rtn", device="cpu")),
        "onnx-int4-fp32": lambda out: export_onnx_int4(str(folders["gptq"]), out, Int4Options(dtype="fp32")),
        "onnx-int4-a4": lambda out: export_onnx_int4(str(folders["gptq"]), out,
                                                     Int4Options(dtype="fp32", accuracy_level=4)),
        "onnx-fp32": lambda out: export_onnx(str(folders["dense"]), out, OnnxOptions(dtype="fp32", device="cpu")),
    }
    for name, step in steps.items():
        if not folders[name].exists():
            print(f"{spec}: building {name}", file=sys.stderr, flush=True)
            step(folders[name])
    return folders


def save_dense(model, tokenizer, out: Path) -> None:
    """The model as an fp16 safetensors folder (written beside `out`, then renamed into place)."""
    from quantkit.export.artifact import staged_output

    with staged_output(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def prompts(folder: Path) -> dict:
    """The token ids both engines get: the chat prompt, the prefill prompts and the 128-token decode prompt."""
    from quantkit.bench import filler_prompt
    from quantkit.chat import render_prompt
    from quantkit.sources import load_tokenizer

    tokenizer = load_tokenizer(folder)
    return {"chat": tokenizer(render_prompt("What is GPTQ?"))["input_ids"],
            "prefill": {str(n): filler_prompt(tokenizer, n) for n in (128, 512)},
            "decode": filler_prompt(tokenizer, 128)}


# ---- one block: a fresh process per engine path ------------------------------------------------------------------


def quantkit_block(spec: dict) -> dict:
    """quantkit's side of a block: the path's backend driven by the shared runner."""
    import torch

    from quantkit.backends import open_backend
    from quantkit.chat import Sampler
    from quantkit.runner import generate

    torch.set_num_threads(spec["threads"])
    backend = open_backend(spec["folder"], dtype=spec["dtype"], device="cpu", native_kernels=spec["native_kernels"])
    greedy = Sampler(vocab_limit=len(backend.tokenizer))
    result = figures(lambda p, n: generate(backend, p, n, greedy, stop_ids=[]), spec)
    return {**result, "decode_weight_bytes": backend.decode_weight_bytes, "backend": backend.name,
            "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": torch.get_num_threads()}}


def block_env(threads: int, kv_gib: int, wait_policy: str | None) -> dict[str, str]:
    """Both engines' environment: the same OpenMP threads (and wait policy, when set), vLLM in-process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    return env | ({"OMP_WAIT_POLICY": wait_policy} if wait_policy else {})


def run_block(engine: str, spec: dict, env: dict[str, str], log: Path) -> dict:
    """One block in a fresh process; its figures, or {"error": ...} naming the log its stderr went to."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    command = ([str(VLLM_PYTHON), str(PROJECT / "benchmarks" / "vllm_worker.py"), f.name] if engine == "vllm"
               else [sys.executable, "-m", "benchmarks.vllm_side_by_side", "--block", f.name])
    with log.open("a") as sink:
        done = subprocess.run(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
    os.unlink(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}; see {log}"}
    return json.loads(lines[-1])


def interleaved() -> list[tuple[str, str]]:
    """quantkit, vLLM, quantkit, vLLM, ... then the rest of the longer list."""
    q, v = [("quantkit", p) for p in QUANTKIT], [("vllm", p) for p in VLLM]
    pairs = [x for pair in zip(q, v) for x in pair]
    return pairs + q[len(v):] + v[len(q):]


def block_spec(engine: str, path: str, folders: dict[str, Path], shared: dict) -> dict:
    fmt, folder, dtype = (QUANTKIT if engine == "quantkit" else VLLM)[path]
    quantization = "gptq" if engine == "vllm" and fmt == "gptq" else None
    return {**shared, "folder": str(folders[folder]), "dtype": dtype, "quantization": quantization,
            "native_kernels": path not in LIBRARY_KERNELS}


# ---- summary -----------------------------------------------------------------------------------------------------


def summarize(samples: dict[str, list[dict]], bandwidth_gbs: float) -> dict[str, dict]:
    """Median over rounds of each figure per path, and decode % of roofline."""
    rows: dict[str, dict] = {}
    for path, results in samples.items():
        good = [r for r in results if "error" not in r]
        row: dict = {"engine": "quantkit" if path in QUANTKIT else "vllm", "format": {**QUANTKIT, **VLLM}[path][0],
                     "rounds": len(good)}
        if not good:
            rows[path] = {**row, "error": results[0]["error"]}
            continue
        row |= {key: statistics.median(r[key] for r in good) for key in FIGURES}
        row["threads"] = good[0]["threads"]
        counted = [r["decode_weight_bytes"] for r in samples[SAME_BYTES.get(path, path)] if "decode_weight_bytes" in r]
        if counted:
            row["decode_weight_bytes"] = counted[0]
            for batch in (1, 8):
                roofline = batch * bandwidth_gbs * 1e9 / counted[0]
                row[f"roofline_pct_{batch}"] = 100 * row[f"decode_{batch}"] / roofline
        rows[path] = row
    return rows


def round_ratios(samples: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Per round, quantkit's best decode over vLLM's best, per format and batch (blocks of one round ran side by
    side, so these ratios hold even when the host's speed swings between rounds)."""
    ratios: dict[str, list[float]] = {}
    rounds = max(len(results) for results in samples.values())
    for fmt in ("gptq", "dense"):
        for batch in (1, 8):
            for round_ in range(rounds):
                best = {engine: max((r[round_][f"decode_{batch}"] for p, r in samples.items()
                                     if p in table and table[p][0] == fmt and round_ < len(r)
                                     and "error" not in r[round_]), default=None)
                        for engine, table in (("quantkit", QUANTKIT), ("vllm", VLLM))}
                if best["quantkit"] and best["vllm"]:
                    ratios.setdefault(f"{fmt}/{batch}", []).append(best["quantkit"] / best["vllm"])
    return ratios


def verdicts(rows: dict[str, dict], samples: dict[str, list[dict]]) -> dict:
    """Best path per engine, format and batch; (a) quantkit's best >= vLLM's best; (b) GPTQ batch 1 >= 50 %."""
    best: dict = {}
    ok = {path: row for path, row in rows.items() if "error" not in row}
    for fmt in ("gptq", "dense"):
        for batch in (1, 8):
            key = f"decode_{batch}"
            for engine in ("quantkit", "vllm"):
                candidates = {p: r[key] for p, r in ok.items() if r["engine"] == engine and r["format"] == fmt}
                if candidates:
                    path = max(candidates, key=candidates.get)
                    best[f"{fmt}/{batch}/{engine}"] = {"path": path, "tok_s": candidates[path]}
    result = {"best": best, "quantkit_at_least_vllm": {}}
    for fmt in ("gptq", "dense"):
        for batch in (1, 8):
            q, v = best.get(f"{fmt}/{batch}/quantkit"), best.get(f"{fmt}/{batch}/vllm")
            if q and v:
                result["quantkit_at_least_vllm"][f"{fmt}/{batch}"] = {"ratio": q["tok_s"] / v["tok_s"],
                                                                      "met": q["tok_s"] >= v["tok_s"]}
    result["per_round"] = round_ratios(samples)
    folder = ok.get("gptq-bf16", {})  # (b) reads the GPTQ folder's bytes: onnx-int4 graphs hold an fp32 LM head
    fastest = best.get("gptq/1/quantkit")
    if fastest and "roofline_pct_1" in folder:
        pct = 100 * fastest["tok_s"] / (folder["decode_1"] / (folder["roofline_pct_1"] / 100))
        result["gptq_roofline_b1"] = {"path": fastest["path"], "pct": pct, "met": pct >= ROOFLINE_TARGET_PCT}
    return result


def shape_table(spec: str, rows: dict[str, dict], verdict: dict) -> list[str]:
    lines = [f"\n## {spec}\n",
             "| format | engine | path | decode b1 tok/s | decode b8 tok/s | roofline b1 | roofline b8 | "
             "prefill 128 tok/s | prefill 512 tok/s | TTFT ms | peak RSS GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in ("gptq", "dense"):
        for path, r in rows.items():
            if r["format"] != fmt:
                continue
            if "error" in r:
                lines.append(f"| {fmt} | {r['engine']} | {path} | {r['error']} |" + " |" * 7)
                continue
            pct = [f"{r[k]:.0f} %" if k in r else "-" for k in ("roofline_pct_1", "roofline_pct_8")]
            lines.append(f"| {fmt} | {r['engine']} | {path} | {r['decode_1']:.1f} | {r['decode_8']:.1f} | "
                         f"{pct[0]} | {pct[1]} | {r['prefill_128']:.0f} | {r['prefill_512']:.0f} | "
                         f"{r['ttft_ms']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    lines.append("")
    for key, q in verdict["quantkit_at_least_vllm"].items():
        fmt, batch = key.split("/")
        best_q, best_v = verdict["best"][f"{key}/quantkit"], verdict["best"][f"{key}/vllm"]
        lines.append(f"- {fmt} batch {batch}: quantkit best {best_q['path']} {best_q['tok_s']:.1f}, vLLM best "
                     f"{best_v['path']} {best_v['tok_s']:.1f} tok/s: {q['ratio']:.2f}x, "
                     f"target (a) {'met' if q['met'] else 'MISSED'}; per round "
                     + " / ".join(f"{r:.2f}x" for r in verdict["per_round"].get(key, [])))
    if "gptq_roofline_b1" in verdict:
        g = verdict["gptq_roofline_b1"]
        lines.append(f"- GPTQ decode batch 1: {g['path']} at {g['pct']:.0f} % of the GPTQ folder's roofline, "
                     f"target (b) >= {ROOFLINE_TARGET_PCT} % {'met' if g['met'] else 'MISSED'}")
    return lines


def write_tables(report: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["settings"]
    lines = ["# quantkit vs vLLM CPU on the same artifact folders (decode, prefill, TTFT, memory, roofline)\n",
             f"Machine: {report['machine_line']}; vLLM {report.get('vllm_version', '?')}.\n",
             f"Command: `{report['command']}`\n",
             f"Copy-test bandwidth {report['bandwidth_gbs']:.1f} GB/s (start) / {report['bandwidth_end_gbs']:.1f} "
             f"GB/s (end); the roofline uses the higher (a copy test beside other jobs reads low). {s['rounds']} "
             f"round(s), each path a fresh process per round, quantkit and vLLM blocks alternating; medians over "
             f"rounds. Decode: {s['new_tokens']}-token call minus 1-token call after a 128-token prompt, greedy, "
             f"no stops (vLLM: ignore_eos, min_tokens, detokenize off). Threads: {s['threads']} for both "
             f"(torch.set_num_threads, OMP_NUM_THREADS, ORT intra-op), OMP_WAIT_POLICY {s['omp_wait_policy']}. "
             f"vLLM in-process (no OpenMP binding; its default multiprocess mode would reserve one core for its "
             f"scheduler process), no prefix caching, VLLM_CPU_KVCACHE_SPACE={s['kv_cache_gib']} GiB (reserved in "
             f"its RSS), enforce_eager.\n"]
    for spec, shape in report["shapes"].items():
        lines += shape_table(spec, shape["rows"], shape["verdicts"])
    lines += ["\n## Notes\n", *[f"- {note}" for note in report["notes"]]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


NOTES = [  # how every sitting is measured; what one sitting saw goes in with --notes
    "Weights are random (seeded presets) with the real StableLM tokenizer; GPTQ folders are RTN-quantized (the "
    "same packed layout as GPTQ, so the same speed).",
    "OpenMP on a shared machine: torch's threads spin at each parallel region's barrier by default; with other "
    "jobs on both cores, a 2-thread torch decode of stablelm-200m measured 1.5 tok/s (1 thread: 22; "
    "OMP_WAIT_POLICY=PASSIVE with 2 threads: 18-21). ONNX Runtime's own thread pool does not collapse that way. "
    "--omp-wait-policy sets the policy for both engines alike (see the header line); on an idle machine leave it "
    "at the runtime's default.",
    "The roofline columns count each path's own decode bytes: onnx-int4 graphs keep the LM head in fp32 (250 vs "
    "149 MiB at 200m, 998 vs 596 MiB at 3b:layers=2), so target (b) reads the fastest GPTQ path's tok/s against "
    "the GPTQ folder's bytes. A busy host lowers both the copy test and the decode rate: read the percentage with "
    "the sitting's bandwidth.",
    "quantkit's CPU decode kernels (quantkit/native, AVX512-BF16; the -library rows are the same folders on torch's "
    "and gptqmodel's kernels only, in the same rounds): each GPT-NeoX layer of a decode step is one call (layer.c: "
    "layer norms, the products, rotary + KV-cache write + fp32 attention, GELU, residuals); at batch 1 the products "
    "are gemv.c's one-row int4/bf16 kernels, at batch 2-16 amx.c's AMX tile products where the CPU has AMX "
    "(elsewhere gptqmodel's and torch's kernels); a decode step whose layers all run on layer.c skips transformers' "
    "model forward (quantkit/decode_step.py).",
    "Roofline: decode weight bytes per step (every weight but the input embedding table) x steps/s / copy-test "
    "bandwidth. vLLM paths use the bytes quantkit's backend counts for the same folder and dtype.",
]


def sitting_notes(path: Path | None) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path else []


def vllm_version() -> str:
    done = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: stablelm-200m, 1 round, fewer tokens")
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(SHAPES)} (--quick: the first)")
    parser.add_argument("--rounds", type=int, help="default: 2 (--quick: 1)")
    parser.add_argument("--new-tokens", type=int, help="decode call length N (default: 32; --quick: 16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY for both engines (default: the OpenMP runtime's); PASSIVE keeps torch's "
                             "threads from spinning against other jobs on a shared machine")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default: 1)")
    parser.add_argument("--work", type=Path, default=PROJECT / "build" / NAME, help="artifact folders (kept)")
    parser.add_argument("--name", default=NAME, help=f"table file name under benchmarks/results (default: {NAME})")
    parser.add_argument("--notes", type=Path, help="a text file of this sitting's notes, one per line, for the table")
    parser.add_argument("--block", help=argparse.SUPPRESS)  # internal: run one quantkit block from a spec file
    args = parser.parse_args()
    if args.block:
        print(json.dumps(quantkit_block(json.loads(Path(args.block).read_text()))), flush=True)
        return

    import torch

    from quantkit.bench import copy_bandwidth_gbs
    from quantkit.machine import machine_info, machine_line

    models = args.models or (list(SHAPES[:1]) if args.quick else list(SHAPES))
    rounds = args.rounds or (1 if args.quick else 2)
    new_tokens = args.new_tokens or (16 if args.quick else 32)
    torch.set_num_threads(args.threads)
    folders = {spec: build(spec, args.work / slug(spec)) for spec in models}
    info = machine_info()
    settings = {"rounds": rounds, "new_tokens": new_tokens, "threads": args.threads, "kv_cache_gib": args.kv_cache_gib,
                "omp_wait_policy": args.omp_wait_policy or "default", "batches": [1, 8], "repeats": 1}
    bandwidth = copy_bandwidth_gbs("cpu")
    env = block_env(args.threads, args.kv_cache_gib, args.omp_wait_policy)
    log = args.work / f"{NAME}.log"
    log.write_text("")
    samples = {spec: {path: [] for _, path in interleaved()} for spec in models}
    shared = {spec: {**settings, "prompts": prompts(folders[spec]["dense"]),
                     "max_model_len": 1024} for spec in models}
    for round_ in range(rounds):
        for spec in models:
            for engine, path in interleaved():
                result = run_block(engine, block_spec(engine, path, folders[spec], shared[spec]), env, log)
                samples[spec][path].append(result)
                shown = result.get("error") or ", ".join(f"{k} {result[k]:.1f}" for k in FIGURES[:5])
                print(f"round {round_ + 1} {spec} {path}: {shown}", file=sys.stderr, flush=True)
    bandwidth_end = copy_bandwidth_gbs("cpu")
    report = {"command": "python -m benchmarks.vllm_side_by_side " + shlex.join(sys.argv[1:]), "machine": info,
              "machine_line": machine_line(info), "vllm_version": vllm_version(), "settings": settings,
              "bandwidth_gbs": bandwidth, "bandwidth_end_gbs": bandwidth_end, "shapes": {},
              "notes": [*NOTES, *sitting_notes(args.notes)]}
    for spec in models:
        rows = summarize(samples[spec], max(bandwidth, bandwidth_end))
        report["shapes"][spec] = {"rows": rows, "verdicts": verdicts(rows, samples[spec]), "samples": samples[spec]}
    write_tables(report, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
