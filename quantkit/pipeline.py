"""`quantkit run RECIPE...`: source -> export (validated) -> evaluate vs the reference -> benchmark -> table.

Each stage records a fingerprint of its inputs (recipe content, source files, tool versions, quantkit's own code,
upstream stage) in `<out>/<recipe>/stages.json`. A stage whose fingerprint is unchanged and whose output is complete
is skipped, so a rerun after an interruption resumes where it stopped, a changed option re-runs only what depends on
it, and a changed quantkit re-runs everything.
Artifacts are written to a temporary folder and renamed into place, so a kill never leaves a half-written one.
Every stage runs in its own process (killed with the run), which also makes its peak RSS its own: each stage's
seconds and peak memory go into the table's JSON (`stages` of each row). What a stage and its libraries print goes
to `<out>/<row>/<stage>.log`; the terminal gets one line per stage, and a failure names the log.
A run holds a lock on each recipe's folder while it works there: a second `quantkit run` on the same `--out`
waits for it, then finds the stages up to date, so concurrent runs never interleave their writes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from quantkit.errors import QuantkitError
from quantkit.fingerprint import code_fingerprint, fingerprint
from quantkit.formats import get_format
from quantkit.export.artifact import verify, versions
from quantkit.paths import atomic_write, file_lock, output_folder
from quantkit.recipe import Recipe, load_recipe
from quantkit.report import EvalRequest, evaluate_backend, model_size_bytes, run_isolated, write_report
from quantkit.bench import BenchSettings, benchmark
from quantkit.sources import model_folder, source_fingerprint, with_revision

RESULTS = Path("benchmarks/results")
Log = Callable[[str], None]


class StageBook:
    """stages.json of one recipe run: which stage ran with which input fingerprint, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def is_current(self, stage: str, inputs: str) -> bool:
        return self.done.get(stage) == inputs

    def mark(self, stage: str, inputs: str) -> None:
        self.done[stage] = inputs
        write_json(self.path, self.done)


@contextmanager
def stage_folder(folder: Path, log: Log) -> Iterator[Path]:
    """`folder`, created and locked against other runs for the duration (they wait here)."""
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock", on_wait=lambda: log(f"  waiting for another quantkit run using {folder}")):
        yield folder


def source_spec(recipe: Recipe) -> str:
    """The recipe's model, pinned to its revision when it has one."""
    return with_revision(recipe.source["model"], recipe.source["revision"])


def override_source(recipe: Recipe, model: str | None, revision: str | None) -> Recipe:
    """`--model` replaces the recipe's source (and drops its revision: a folder has none); `--revision` pins it."""
    source = dict(recipe.source)
    if model is not None:
        source.update(model=model, revision="")
    if revision is not None:
        source["revision"] = revision
    return dataclasses.replace(recipe, source=source)


def export_artifact(recipe: Recipe, out: Path) -> None:
    """The recipe's export into `out` (replacing an older one), the manifest carrying the recipe."""
    fmt = get_format(recipe.export["format"])
    fmt.export(source_spec(recipe), out, recipe.export, True, {"recipe": recipe.as_dict()})


def eval_request(recipe: Recipe) -> EvalRequest:
    e = recipe.eval
    dtype = None if recipe.source["dtype"] == "auto" else recipe.source["dtype"]
    return EvalRequest(data=e["data"], reference=source_spec(recipe), window=e["window"] or None,
                       stride=e["stride"] or None, batch_size=e["batch_size"], kld_tokens=e["kld_tokens"], dtype=dtype)


def bench_settings(recipe: Recipe) -> BenchSettings:
    b = recipe.bench
    return BenchSettings(prompt_lengths=tuple(b["prompt_lengths"]), decode_batches=tuple(b["batches"]),
                         decode_tokens=b["decode_tokens"], repeats=b["repeats"])


def measure_stage(spec: str, request: EvalRequest, settings: BenchSettings | None) -> dict:
    """Eval (settings None) or bench of one model, for a fresh process."""
    from quantkit.backends import open_backend

    backend = open_backend(spec, dtype=request.dtype, device=request.device)
    if settings is None:
        reference = backend if spec == request.reference else None
        return evaluate_backend(backend, request, reference=reference)
    return {**benchmark(backend, settings), "size_bytes": model_size_bytes(spec, backend)}


def timed_stage(function, args: tuple, log_file: Path) -> tuple[dict, dict]:
    """`function(*args)` in its own process, its output going to `log_file`: (its result, {seconds, peak_rss_bytes}).
    A failure is one line naming the log."""
    start = time.perf_counter()
    try:
        result, peak = run_isolated(function, *args, log_file=log_file)
    except QuantkitError as exc:
        raise QuantkitError(f"{exc} (log: {log_file})") from None
    except Exception as exc:  # a bug or a library failure in the stage: its traceback is in the log
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise QuantkitError(f"{log_file.stem} failed: {type(exc).__name__}: {first} (traceback in {log_file})") from None
    return result, {"seconds": round(time.perf_counter() - start, 2), "peak_rss_bytes": peak}


def stage_line(row: str, stage: str, figures: dict | None, verdict: str) -> str:
    """One line per stage: row, stage, seconds, peak memory, verdict (or "up to date")."""
    if figures is None:
        return f"{row:<18} {stage:<7} {'':>9} {'':>9}  up to date ({verdict})"
    return (f"{row:<18} {stage:<7} {figures['seconds']:7.1f} s {figures['peak_rss_bytes'] / 2**30:5.2f} GiB  "
            f"{verdict}")


def verdict(stage: str, result: dict) -> str:
    if stage == "eval":
        return f"perplexity {result['perplexity']['token_perplexity']:.3f}"
    batch = min(result["decode"], key=int)
    return f"decode {result['decode'][batch]['median']:.1f} tok/s at batch {batch}"


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def cached_stage(row: str, book: StageBook, stage: str, inputs: str, output: Path, function, args: tuple,
                 log: Log) -> dict:
    """The stage's recorded result when its inputs are unchanged, else a fresh run of `function(*args)`."""
    if book.is_current(stage, inputs) and output.is_file():
        result = json.loads(output.read_text())
        log(stage_line(row, stage, None, verdict(stage, result)))
        return result
    result, figures = timed_stage(function, args, output.with_suffix(".log"))
    result["stage"] = figures
    write_json(output, result)
    book.mark(stage, inputs)
    log(stage_line(row, stage, figures, verdict(stage, result)))
    return result


def measure_rows(name: str, spec: str, folder: Path, book: StageBook, upstream: str, request: EvalRequest,
                 settings: BenchSettings, log: Log, stages: dict | None = None) -> dict:
    """The eval and bench stages of one model; a table row (with `stages`: each stage's seconds and peak RSS)."""
    ev = cached_stage(name, book, "eval", fingerprint(upstream, dataclasses.asdict(request)), folder / "eval.json",
                      measure_stage, (spec, request, None), log)
    bench = cached_stage(name, book, "bench", fingerprint(upstream, dataclasses.asdict(settings)), folder / "bench.json",
                         measure_stage, (spec, request, settings), log)
    stages = {**(stages or {}), "eval": ev.pop("stage", None), "bench": bench.pop("stage", None)}
    return {"model": spec, "name": name, "backend": ev["backend"], "size_bytes": bench["size_bytes"],
            "eval": ev, "bench": bench, "stages": stages}


def export_fingerprint(recipe: Recipe) -> str:
    """The export stage's inputs: source files, export options, tool versions and quantkit's code."""
    return fingerprint(source_fingerprint(source_spec(recipe)), recipe.export, versions(), code_fingerprint())


def reference_fingerprint(spec: str) -> str:
    """The reference row's inputs: the source model's files and quantkit's code."""
    return fingerprint(source_fingerprint(spec), code_fingerprint())


def run_recipe(recipe: Recipe, out_root: Path, force: bool, log: Log) -> dict:
    with stage_folder(out_root / recipe.name, log) as folder:
        return run_recipe_in(recipe, folder, force, log)


def run_recipe_in(recipe: Recipe, folder: Path, force: bool, log: Log) -> dict:
    if force:
        (folder / "stages.json").unlink(missing_ok=True)
    book = StageBook(folder / "stages.json")
    artifact = folder / "artifact"
    export_inputs = export_fingerprint(recipe)
    record = folder / "export.json"
    done = f"{recipe.export['format']} of {source_spec(recipe)}, validated"
    if book.is_current("export", export_inputs) and artifact.is_dir() and not verify(artifact) and record.is_file():
        log(stage_line(recipe.name, "export", None, f"{done}, manifest verifies"))
    else:
        _, figures = timed_stage(export_artifact, (recipe, artifact), folder / "export.log")
        write_json(record, figures)
        book.mark("export", export_inputs)
        log(stage_line(recipe.name, "export", figures, done))
    return measure_rows(recipe.name, str(artifact), folder, book, export_inputs, eval_request(recipe),
                        bench_settings(recipe), log, stages={"export": json.loads(record.read_text())})


def reference_row(recipe: Recipe, out_root: Path, log: Log) -> dict:
    """The source model measured once per run (it checks itself: KL 0, top-1 100 %)."""
    spec = source_spec(recipe)
    with stage_folder(out_root / f"reference-{fingerprint(recipe.source)}", log) as folder:
        return measure_rows("reference", spec, folder, StageBook(folder / "stages.json"), reference_fingerprint(spec),
                            eval_request(recipe), bench_settings(recipe), log)


def run(recipe_paths: list[str], out_root: Path, force: bool = False, results: Path = RESULTS,
        table_name: str | None = None, model: str | None = None, revision: str | None = None,
        overrides: Sequence[str] = (), log: Log = print, made_by: list[str] | None = None) -> dict[str, Path]:
    """Run every recipe (with `model` replacing their source, e.g. a local folder for a hub id, `revision` pinning
    it and `overrides` applied), then write one table (reference first) to `results`; `made_by` is the command the
    table names (by default the `quantkit run` command these arguments make)."""
    recipes = [override_source(load_recipe(path, overrides), model, revision) for path in recipe_paths]
    shared = {(source_spec(r), r.source["dtype"], json.dumps(r.eval), json.dumps(r.bench)) for r in recipes}
    if len(shared) > 1:
        raise QuantkitError("recipes in one run must share source, eval and bench settings (run them separately)")
    model_folder(source_spec(recipes[0]))  # a missing or broken local source fails here, before any folder is made
    output_folder(out_root)
    output_folder(results)
    rows = [reference_row(recipes[0], out_root, log)]
    rows += [run_recipe(recipe, out_root, force, log) for recipe in recipes]
    from quantkit.machine import machine_info, machine_line

    info = machine_info()
    command = made_by or ["quantkit", "run", *recipe_paths, *(["--model", model] if model else []),
                          *(["--revision", revision] if revision else []),
                          *(word for override in overrides for word in ("--set", override))]
    return write_report(rows, info, machine_line(info), results, table_name or recipes[0].name, command)
