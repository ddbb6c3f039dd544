"""Quality and speed per model, and the benchmark tables: JSON, Markdown and a PNG plot.

One row per model or artifact: perplexity, its change vs the reference, mean KL divergence, top-1 agreement,
prefill and decode tokens/s, speed-up vs the reference, % of the bandwidth roofline, size and peak memory.
The machine heads every table.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import shlex
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from quantkit.agreement import compare, reference_rows
from quantkit.backends import Backend, open_backend
from quantkit.bench import BenchSettings, benchmark, folder_bytes
from quantkit.data import load_dataset
from quantkit.errors import QuantkitError
from quantkit.evaluate import Method, perplexity
from quantkit.paths import atomic_write, output_folder
from quantkit.sources import default_device, source_fingerprint

DEFAULT_WINDOW = 2048
KLD_TOKENS = 16384
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def source_id(spec: str, request: "EvalRequest") -> str:
    """A cache identity for a model as `open_backend(spec, request.dtype, request.device)` runs it."""
    return f"{spec}|{request.dtype or 'auto'}|{request.device or default_device()}|{source_fingerprint(spec)}"


def method_for(backend: Backend, window: int | None, stride: int | None, batch_size: int) -> Method:
    """Defaults: window = min(2048, the model's positions), stride = window / 4."""
    window = window or min(DEFAULT_WINDOW, backend.max_positions)
    if window > backend.max_positions:
        raise QuantkitError(f"window {window} exceeds the model's {backend.max_positions} positions")
    return Method(window=window, stride=stride or max(window // 4, 1), batch_size=batch_size)


@dataclass(frozen=True)
class EvalRequest:
    data: str
    reference: str | None = None
    window: int | None = None
    stride: int | None = None
    batch_size: int = 4
    kld_tokens: int = KLD_TOKENS
    dtype: str | None = None
    device: str | None = None


def evaluate_backend(backend: Backend, request: EvalRequest, reference: Backend | None = None) -> dict:
    """Perplexity of `backend`, plus KL/top-1 agreement when a reference is named (opened unless given)."""
    dataset = load_dataset(request.data)
    method = method_for(backend, request.window, request.stride, request.batch_size)
    record = {"data": request.data, "window": method.window, "stride": method.stride, "backend": backend.name}
    if request.reference is None:
        record["perplexity"] = perplexity(backend, dataset, method).as_dict()
        return record
    def open_reference() -> Backend:  # only when its rows are not cached yet
        return reference or open_backend(request.reference, dtype=request.dtype, device=request.device)

    rows = reference_rows(open_reference, source_id(request.reference, request), dataset, method, request.kld_tokens)
    result, agreement = compare(backend, rows, dataset, method)
    record.update(perplexity=result.as_dict(), reference_perplexity=rows.perplexity, agreement=agreement)
    return record


def model_size_bytes(spec: str, backend: Backend) -> int:
    folder = Path(spec)
    return folder_bytes(folder) if folder.is_dir() else backend.decode_weight_bytes


def measure_model(spec: str, request: EvalRequest, settings: BenchSettings) -> dict:
    """Eval + bench of one model or artifact: one table row's worth of figures (run in a fresh process by
    `measure_models`, so its peak memory is its own)."""
    backend = open_backend(spec, dtype=request.dtype, device=request.device)
    row = {"model": spec, "backend": backend.name, "size_bytes": model_size_bytes(spec, backend)}
    row["eval"] = evaluate_backend(backend, request, reference=backend if spec == request.reference else None)
    row["bench"] = benchmark(backend, settings)
    return row


def die_with_parent() -> None:
    """Pool initializer: on Linux, the worker is killed when its parent dies (a SIGKILLed `quantkit run` must not
    leave an export finishing, and publishing, behind its back)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_setup(log_file: str | None) -> None:
    """Pool initializer: die with the parent; with `log_file`, the worker's stdout and stderr (its libraries'
    banners and progress bars included) go there."""
    die_with_parent()
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def call_measured(function, args: tuple) -> tuple:
    """In the worker: the result and the worker's peak RSS in bytes (a failure's traceback is printed, into the
    log when there is one)."""
    try:
        result = function(*args)
    except BaseException:
        traceback.print_exc()
        raise
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_isolated(function, *args, log_file: Path | None = None) -> tuple:
    """`function(*args)` in a spawned process, so its peak memory and allocator state are its own; returns
    (result, that process's peak RSS in bytes). Its output goes to `log_file` when given. A process that dies (the
    kernel's OOM killer, a crash) is a one-line error, not a hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    setup = (str(log_file) if log_file else None,)
    with ProcessPoolExecutor(1, mp_context=context, initializer=worker_setup, initargs=setup) as pool:
        try:
            return pool.submit(call_measured, function, args).result()
        except BrokenProcessPool:
            raise QuantkitError(f"the process running {function.__name__} died (killed for lack of memory? "
                                "see `dmesg`)") from None


def in_fresh_process(function, *args):
    """`function(*args)` in a spawned process (see run_isolated)."""
    return run_isolated(function, *args)[0]


def measure_models(specs: list[str], request: EvalRequest, settings: BenchSettings) -> list[dict]:
    """`measure_model` for each spec, each in its own process."""
    return [in_fresh_process(measure_model, spec, request, settings) for spec in specs]


def table_row(row: dict, reference: dict) -> dict[str, str]:
    """The Markdown cells of one row; speed-up and Δ% are against the reference row."""
    ppl = row["eval"]["perplexity"]["token_perplexity"]
    ref_ppl = reference["eval"]["perplexity"]["token_perplexity"]
    agreement = row["eval"].get("agreement", {})
    prefill = row["bench"]["prefill"]
    longest = max(prefill, key=int) if prefill else None
    decode = row["bench"]["decode"]["1"]
    ref_decode = reference["bench"]["decode"]["1"]["median"]
    widest = max(row["bench"]["decode"], key=int)
    return {
        "model": f"{row['backend']} `{row.get('name') or Path(row['model']).name}`",
        "perplexity": f"{ppl:.3f}",
        "Δ% vs ref": f"{100 * (ppl / ref_ppl - 1):+.2f}",
        "mean KLD": f"{agreement['kl_mean']:.5f}" if agreement else "—",
        "top-1 agree": f"{100 * agreement['top1_agreement']:.2f}%" if agreement else "—",
        f"prefill tok/s ({longest})": f"{prefill[longest]['median']:.0f}" if longest else "—",
        "decode tok/s (b1)": f"{decode['median']:.1f}",
        f"decode tok/s (b{widest})": f"{row['bench']['decode'][widest]['median']:.1f}",
        "speed-up vs ref": f"{decode['median'] / ref_decode:.2f}x",
        "% roofline (b1)": f"{decode['roofline_pct']:.1f}%",
        "size": f"{row['size_bytes'] / 2**20:.1f} MiB",
        "peak memory": f"{row['bench']['peak_memory_bytes'] / 2**20:.0f} MiB",
    }


def markdown(rows: list[dict], machine_line: str, title: str, eval_line: str) -> str:
    cells = [table_row(row, rows[0]) for row in rows]
    header = list(cells[0])
    lines = [f"# {title}", "", f"Machine: {machine_line}", "", eval_line, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.values()) + " |" for cell in cells]
    lines += stage_lines(rows)
    return "\n".join(lines) + "\n"


def stage_lines(rows: list[dict]) -> list[str]:
    """The cost of each pipeline stage (rows from `quantkit run`), each measured in its own process."""
    staged = [row for row in rows if row.get("stages")]
    if not staged:
        return []
    lines = ["", "Stage cost (each stage in its own process; \"cached\" = skipped, figures from its first run):", "",
             "| model | stage | seconds | peak RSS |", "|---|---|---:|---:|"]
    for row in staged:
        for stage, figures in row["stages"].items():
            if figures:
                lines.append(f"| {row.get('name') or row['model']} | {stage} | {figures['seconds']:.1f} | "
                             f"{figures['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Quality loss (Δ% perplexity) against decode speed-up, one point per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        cells = table_row(row, ref)
        x, y = float(cells["speed-up vs ref"].rstrip("x")), float(cells["Δ% vs ref"])
        ax.scatter(x, y)
        ax.annotate(row["backend"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("decode speed-up vs reference (batch 1)")
    ax.set_ylabel("perplexity change vs reference (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], machine: dict, machine_line: str, out_dir: Path, name: str,
                 command: list[str] | None = None) -> dict[str, Path]:
    """benchmarks/results/<name>.json, .md and .png; the first row is the reference. `command`, the command line
    that made the table, is recorded in both."""
    output_folder(out_dir)
    first = rows[0]["eval"]
    eval_line = f"Quality: `{first['data']}`, window {first['window']}, stride {first['stride']}; " \
                f"KLD and top-1 vs the first row; speed through the shared runner, median of repeats."
    paths = {suffix: out_dir / f"{name}.{suffix}" for suffix in ("json", "md", "png")}
    if command:
        eval_line += f"\n\nMade by: `{' '.join(shlex.quote(word) for word in command)}`"
    table = json.dumps({"machine": machine, "command": command, "rows": rows}, indent=2) + "\n"
    atomic_write(paths["json"], lambda tmp: tmp.write_text(table))
    atomic_write(paths["md"], lambda tmp: tmp.write_text(markdown(rows, machine_line, name, eval_line)))
    atomic_write(paths["png"], lambda tmp: plot(rows, tmp, name))
    return paths
