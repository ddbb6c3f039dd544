"""The actions behind the CLI commands: glue between arguments, backends, the runner and the terminal."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from quantkit.backends import Backend, open_backend
from quantkit.chat import Sampler, fit_history, render_prompt, stop_token_ids
from quantkit.errors import QuantkitError
from quantkit.runner import Generation, generate


class TextStream:
    """Turns one row's token ids into text deltas as they arrive (multi-byte characters stay whole)."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.write(text[len(self.shown) :])
            self.shown = text


def sampler_from_args(args: argparse.Namespace, backend: Backend) -> Sampler:
    return Sampler(
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        vocab_limit=len(backend.tokenizer),
    )


def answer(
    backend: Backend, prompt_ids: list[int], sampler: Sampler, max_new_tokens: int, fit_context: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """Run the shared loop on one tokenized prompt, stopping on the card's stop tokens."""
    (result,) = generate(
        backend,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        stop_ids=stop_token_ids(backend.tokenizer),
        on_token=on_token,
        cap_to_context=fit_context,
    )
    return result


def answer_from_args(backend: Backend, prompt_ids: list[int], args: argparse.Namespace,
                     on_token: Callable[[int, int], None] | None = None) -> Generation:
    return answer(backend, prompt_ids, sampler_from_args(args, backend), args.max_new_tokens, args.fit_context,
                  on_token)


def print_timings(result: Generation, backend: Backend) -> None:
    t = result.timings
    print(
        f"[{backend.name}] {len(result.token_ids)} tokens, stop: {describe_stop(result, backend)} | "
        f"TTFT {t.ttft_s * 1000:.1f} ms | prefill {t.prefill_tok_s:.1f} tok/s ({t.prompt_tokens} tokens) | "
        f"decode {t.decode_tok_s:.1f} tok/s",
        file=sys.stderr,
    )


def describe_stop(result: Generation, backend: Backend) -> str:
    if result.stop_reason == "context":
        return f"context limit ({backend.max_positions} positions)"
    if result.stop_token is None:
        return "length limit"
    return f"{backend.tokenizer.convert_ids_to_tokens(result.stop_token)} ({result.stop_token})"


def generate_answer(args: argparse.Namespace) -> dict:
    """`quantkit generate`: stream the answer (or collect it for --json) and return the JSON record."""
    backend = open_backend(args.model, dtype=args.dtype, device=args.device)
    prompt_text = render_prompt(args.prompt, system=args.system)
    stream = None if args.json else TextStream(backend.tokenizer, lambda s: print(s, end="", flush=True))
    result = answer_from_args(backend, backend.tokenizer(prompt_text)["input_ids"], args, on_token=stream)
    if not args.json:
        print()
        print_timings(result, backend)
    return {
        "backend": backend.name,
        "prompt": prompt_text,
        "prompt_ids": result.prompt_ids,
        "text": backend.tokenizer.decode(result.token_ids, skip_special_tokens=True),
        "token_ids": result.token_ids,
        "stop_reason": result.stop_reason,
        "stop_token": result.stop_token,
        "stop_token_text": None if result.stop_token is None else describe_stop(result, backend),
        "timings": result.timings.as_dict(),
    }


def chat(args: argparse.Namespace) -> int:
    """`quantkit chat`: multi-turn, streaming; an empty line or EOF ends it. The conversation stays within the
    model's positions: the oldest whole turns are dropped when the next one would not fit (the system prompt
    stays), and a message that cannot fit alone is refused."""
    backend = open_backend(args.model, dtype=args.dtype, device=args.device)
    history: list[tuple[str, str]] = []
    print(f"chatting with {args.model} ({backend.name}); empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        try:
            prompt_ids, dropped = fit_history(backend.tokenizer, user, history, backend.max_positions,
                                              args.max_new_tokens, system=args.system)
        except QuantkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if dropped:
            history = history[dropped:]
            print(f"(dropped the oldest {dropped} turn(s) to stay within the model's {backend.max_positions} "
                  "positions)", file=sys.stderr)
        print("stablelm> ", end="", flush=True)
        stream = TextStream(backend.tokenizer, lambda s: print(s, end="", flush=True))
        result = answer_from_args(backend, prompt_ids, args, on_token=stream)
        print()
        print_timings(result, backend)
        history.append((user, stream.shown))
    return 0


def demo(prompt: str, out: str = "out", results: str = "benchmarks/results") -> int:
    """`quantkit demo`: the tiny StableLM end to end: answer one prompt through the runner (greedy, streamed), then
    run the tiny recipes (GPTQ, RTN, ONNX: export, validate, evaluate, benchmark), one line per stage, and print the
    table. Libraries' output goes to each stage's log under `out`."""
    from pathlib import Path

    from transformers.utils import logging as transformers_logging

    from quantkit.chat import CARD_MAX_NEW_TOKENS
    from quantkit.paths import PROJECT_ROOT
    from quantkit.pipeline import run

    transformers_logging.disable_progress_bar()
    backend = open_backend("tiny")
    print(f"user: {prompt}\nassistant: ", end="", flush=True)
    stream = TextStream(backend.tokenizer, lambda s: print(s, end="", flush=True))
    sampler = Sampler(vocab_limit=len(backend.tokenizer))
    answer(backend, backend.tokenizer(render_prompt(prompt))["input_ids"], sampler, CARD_MAX_NEW_TOKENS,
           on_token=stream)
    print("\n")
    recipes = sorted(str(p) for p in (PROJECT_ROOT / "recipes").glob("tiny-*.toml"))
    paths = run(recipes, Path(out), results=Path(results), table_name="tiny-cpu", made_by=["quantkit", "demo"])
    print()
    print(paths["md"].read_text())
    return 0


def eval_request(args: argparse.Namespace, reference: str | None) -> "EvalRequest":
    from quantkit.report import EvalRequest

    return EvalRequest(data=args.data, reference=reference, window=args.window, stride=args.stride,
                       batch_size=args.batch_size, kld_tokens=args.kld_tokens, dtype=args.dtype, device=args.device)


def bench_settings(args: argparse.Namespace) -> "BenchSettings":
    from quantkit.bench import BenchSettings

    return BenchSettings(prompt_lengths=tuple(args.prompt_lengths), decode_batches=tuple(args.batches),
                         decode_tokens=args.decode_tokens, repeats=args.repeats, bandwidth_gbs=args.bandwidth_gbs)


def evaluate(args: argparse.Namespace) -> dict:
    """`quantkit eval`."""
    from quantkit.data import load_dataset
    from quantkit.report import evaluate_backend

    load_dataset(args.data)  # a bad spec fails before the model loads
    backend = open_backend(args.model, dtype=args.dtype, device=args.device)
    return evaluate_backend(backend, eval_request(args, args.reference))


def bench(args: argparse.Namespace) -> dict:
    """`quantkit bench`: the model, and the reference when named, with the decode speed-up."""
    from quantkit.bench import benchmark

    settings = bench_settings(args)
    if args.best:
        from pathlib import Path

        from quantkit.best import best_path

        if args.reference:
            raise QuantkitError("--best compares the paths of one folder: drop --reference")
        if not Path(args.model).is_dir():
            raise QuantkitError(f"--best needs an artifact or model folder as --model: {args.model} is not a folder")
        return best_path(Path(args.model), settings, args.device)
    record = {"model": benchmark(open_backend(args.model, dtype=args.dtype, device=args.device), settings)}
    if args.reference:
        record["reference"] = benchmark(open_backend(args.reference, dtype=args.dtype, device=args.device), settings)
        record["decode_speedup_b1"] = (
            record["model"]["decode"][str(settings.decode_batches[0])]["median"]
            / record["reference"]["decode"][str(settings.decode_batches[0])]["median"]
        )
    return record


def print_record(record: dict, as_json: bool) -> int:
    """One JSON object, or the same figures as indented `key: value` lines."""
    if as_json:
        print(json.dumps(record, indent=2))
        return 0

    def show(value, indent: str) -> None:
        for key, item in value.items():
            if isinstance(item, dict):
                print(f"{indent}{key}:")
                show(item, indent + "  ")
            else:
                print(f"{indent}{key}: {item:.6g}" if isinstance(item, float) else f"{indent}{key}: {item}")

    show(record, "")
    return 0


def report(args: argparse.Namespace) -> int:
    """`quantkit report`: eval + bench for each model (the first is the reference), then the tables."""
    from pathlib import Path

    from quantkit.machine import machine_info, machine_line
    from quantkit.paths import output_folder
    from quantkit.report import measure_models, write_report

    output_folder(Path(args.results))  # an unwritable folder fails now, not after the measurements
    settings = bench_settings(args)
    request = eval_request(args, reference=args.models[0])  # the reference row checks itself: KL 0, 100 %
    rows = measure_models(args.models, request, settings)
    info = machine_info()
    paths = write_report(rows, info, machine_line(info), Path(args.results), args.name)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """`quantkit export --fmt FORMAT`: the format's exporter with the parsed options."""
    from pathlib import Path

    from quantkit.formats import get_format

    get_format(args.fmt).export(args.model, Path(args.out), vars(args), args.overwrite, None)
    print(f"wrote {args.out}")
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    """`quantkit run`: every stage of every recipe, then the table."""
    from pathlib import Path

    from quantkit.pipeline import run

    paths = run(args.recipes, Path(args.out), force=args.force, results=Path(args.results), table_name=args.name,
                model=args.model, revision=args.revision, overrides=args.set)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def verify(folder: str) -> int:
    """`quantkit verify`: exit 1 and list the problems when a file no longer matches the manifest or the folder
    misses something a downstream loader expects."""
    from pathlib import Path

    from quantkit.export.artifact import read_manifest, source_lines, verify as verify_folder
    from quantkit.formats import serving_problems

    manifest = read_manifest(Path(folder))
    for line in source_lines(manifest):
        print(line)
    problems = verify_folder(Path(folder))
    problems += serving_problems(Path(folder), manifest["format"])
    for problem in problems:
        print(problem)
    print(f"{folder}: {'FAILED' if problems else 'OK'} ({len(problems)} problem(s))", file=sys.stderr)
    return 1 if problems else 0
