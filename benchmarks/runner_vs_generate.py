"""Decode tokens/s of quantkit's runner vs transformers' `model.generate`, side by side, same model and dtype.

Both are timed the same way: wall time of a 1-token call (prefill) subtracted from an N-token call, so the
figure is decode only. Greedy, no stop tokens, fixed length; median of repeats, interleaved so machine noise
hits both alike.

    python -m benchmarks.runner_vs_generate [--models tiny stablelm-200m] [--batches 1 8] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from quantkit.machine import machine_info, machine_line
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import Sampler, render_prompt
from quantkit.runner import generate
from quantkit.sources import load_model

RESULTS = Path(__file__).parent / "results"


def runner_call(backend: TorchBackend, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    generate(backend, prompts, new_tokens, Sampler(), stop_ids=[])
    return time.perf_counter() - start


def generate_call(backend: TorchBackend, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=backend.tokenizer.pad_token_id,
        )
    return time.perf_counter() - start


def decode_tok_s(call, backend, prompts, new_tokens: int) -> float:
    """(new_tokens - 1) * batch tokens over the time an N-token call takes beyond a 1-token call."""
    extra = call(backend, prompts, new_tokens) - call(backend, prompts, 1)
    return (new_tokens - 1) * len(prompts) / extra


def bench(spec: str, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    model, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
    backend = TorchBackend(model, tokenizer, name="torch-fp32")
    prompt = tokenizer(render_prompt("Explain the assert statement."))["input_ids"]
    rows = []
    for batch in batches:
        prompts = [prompt] * batch
        runner_call(backend, prompts, 4), generate_call(backend, prompts, 4)  # warm-up
        runner, hf = [], []
        for _ in range(repeats):
            runner.append(decode_tok_s(runner_call, backend, prompts, new_tokens))
            hf.append(decode_tok_s(generate_call, backend, prompts, new_tokens))
        row = {
            "model": spec,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": batch,
            "runner_tok_s": statistics.median(runner),
            "generate_tok_s": statistics.median(hf),
        }
        row["speedup"] = row["runner_tok_s"] / row["generate_tok_s"]
        print(f"{spec} batch {batch}: runner {row['runner_tok_s']:.1f} tok/s, generate {row['generate_tok_s']:.1f} "
              f"tok/s, runner/generate {row['speedup']:.2f}x", flush=True)
        rows.append(row)
    return rows


def write_tables(rows: list[dict], info: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Runner vs transformers generate (decode, fp32, greedy)\n",
        f"Machine: {machine_line(info)}\n",
        "| model | params (M) | batch | runner tok/s | generate tok/s | runner / generate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params_m']} | {r['batch']} | {r['runner_tok_s']:.1f} | {r['generate_tok_s']:.1f} | "
        f"{r['speedup']:.2f}x |"
        for r in rows
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "stablelm-200m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for spec in args.models for row in bench(spec, args.batches, args.new_tokens, args.repeats)]
    write_tables(rows, machine_info(), "runner_vs_generate")


if __name__ == "__main__":
    main()
