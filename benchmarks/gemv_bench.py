"""One decode step's linears on quantkit's CPU kernels vs the libraries' (why quantkit.native exists).

For a GPTQ folder, as a decode step of `--rows` rows (batch size; default 1) runs them: every int4 layer in model
order (gptqmodel's kernel vs quantkit's: gemv.c at one row, amx.c or rows.c at 2-16), then the bf16 LM head
(torch's F.linear vs quantkit's). Each pass walks all layers, so the weights come from DRAM as in decode, not from
a cache holding one layer. Passes alternate between the two kernels, rounds times; the figures are the medians
(and the best) of the passes, with the weight bytes read per second.

    python -m benchmarks.gemv_bench GPTQ_FOLDER [GPTQ_FOLDER...] [--rows 1] [--rounds 15] [--threads 2]
        [--name gemv]   (--name names the table: one per CPU and row count)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.runner_vs_generate import RESULTS
from quantkit import native
from quantkit.backends.gptq import open_gptq
from quantkit.decode_linear import DecodeLinear
from quantkit.errors import QuantkitError
from quantkit.machine import machine_info, machine_line
from quantkit.sources import check_folder


def passes(calls: dict[str, list], rounds: int) -> dict[str, list[float]]:
    """Seconds of each kernel's pass over its calls, passes alternating."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds + 1):  # the first round warms up
        for name, pass_calls in calls.items():
            start = time.perf_counter()
            for call in pass_calls:
                call()
            seconds[name].append(time.perf_counter() - start)
    return {name: values[1:] for name, values in seconds.items()}


def weight_bytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))


@torch.inference_mode()
def measure(folder: Path, rows: int, rounds: int) -> dict:
    """Both kernels' passes over the folder's int4 layers and over its LM head, on `rows` rows of x."""
    model = open_gptq(folder, "cpu").model
    head = model.get_output_embeddings()
    int4 = [m for m in model.modules() if isinstance(m, DecodeLinear) and m is not head]
    x = {id(m): torch.randn(rows, 1, m.layer.in_features, dtype=torch.bfloat16) for m in (*int4, head)}
    parts = {
        "int4 layers": (int4, f"gptqmodel {type(int4[0].layer).__name__}"),
        "lm head": ([head], "torch F.linear (oneDNN)"),
    }
    kernel = "gemv.c" if rows == 1 else "amx.c" if native.rows_on_amx() else "rows.c"
    result = {"model": str(folder), "int4_layers": len(int4), "quantkit_kernel": kernel, "parts": {}}
    for part, (layers, library) in parts.items():
        calls = {"library": [lambda m=m: m.layer(x[id(m)]) for m in layers],
                 "quantkit": [lambda m=m: m(x[id(m)]) for m in layers]}
        nbytes = sum(weight_bytes(m.layer) for m in layers)
        figures = {name: {"median_ms": 1e3 * statistics.median(s), "best_ms": 1e3 * min(s),
                          "gb_s": nbytes / statistics.median(s) / 1e9} for name, s in passes(calls, rounds).items()}
        speedup = figures["library"]["median_ms"] / figures["quantkit"]["median_ms"]
        result["parts"][part] = {"weight_bytes": nbytes, "library_kernel": library, **figures, "speedup": speedup}
        print(f"{folder.parent.name} {part}: {library} {figures['library']['median_ms']:.2f} ms "
              f"({figures['library']['gb_s']:.1f} GB/s), quantkit {figures['quantkit']['median_ms']:.2f} ms "
              f"({figures['quantkit']['gb_s']:.1f} GB/s): {speedup:.2f}x", flush=True)
    return result


def write_tables(record: dict, name: str) -> None:
    rows = record["rows"]
    lines = [f"# Batch-{rows} decode linears: quantkit's CPU kernels vs the libraries'", "",
             f"Machine: {machine_line(record['machine'])}; {record['threads']} threads.", "",
             f"Command: `{record['command']}`", "",
             f"Each pass runs every int4 layer of the model in order (or the LM head) on {rows} bf16 row(s), so the "
             "weights come from DRAM as in a decode step; passes of the two kernels alternate, "
             f"{record['rounds']} rounds; medians. GB/s: weight bytes (with scales and zeros) read per second.", "",
             "| model | part | weight MB | library kernel | library ms | GB/s | quantkit kernel | quantkit ms | GB/s | "
             "speed-up |",
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for model in record["models"]:
        for part, row in model["parts"].items():
            lib, own = row["library"], row["quantkit"]
            lines.append(f"| {Path(model['model']).parent.name} | {part} | {row['weight_bytes'] / 1e6:.0f} | "
                         f"{row['library_kernel']} | {lib['median_ms']:.2f} | {lib['gb_s']:.1f} | "
                         f"{model['quantkit_kernel']} | {own['median_ms']:.2f} | {own['gb_s']:.1f} | "
                         f"{row['speedup']:.2f}x |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="GPTQ 4-bit folders (bf16 LM head)")
    parser.add_argument("--rows", type=int, default=1, choices=range(1, native.MAX_ROWS + 1), metavar="1-16",
                        help="rows of x: the decode batch size (default: 1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="gemv", help="table name under benchmarks/results (one per CPU)")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("quantkit's kernels do not run here (they need AVX512-BF16 and a C compiler)")
    try:
        for folder in args.folders:
            if "quantization_config" not in check_folder(folder):
                raise QuantkitError(f"{folder} is not a GPTQ folder (its config.json has no quantization_config)")
    except QuantkitError as exc:
        raise SystemExit(f"error: {exc}") from None
    torch.set_num_threads(args.threads)
    record = {"machine": machine_info(), "threads": args.threads, "rows": args.rows, "rounds": args.rounds,
              "command": "python -m benchmarks.gemv_bench " + " ".join(map(str, args.folders))
                         + f" --rows {args.rows} --rounds {args.rounds} --threads {args.threads} --name {args.name}",
              "models": [measure(folder, args.rows, args.rounds) for folder in args.folders]}
    write_tables(record, args.name)


if __name__ == "__main__":
    main()
