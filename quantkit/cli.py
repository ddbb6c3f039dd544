"""The `quantkit` command line (argument parsing only; each command calls a function in quantkit.app)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS

MODEL_HELP = (
    "hub id (ID@REVISION pins a commit or tag), local Hugging Face folder, exported artifact folder, or preset "
    "(tiny, tiny-stablelm, stablelm-200m, stablelm-3b, stablelm-7b; add :layers=N to cut depth)"
)
REVISION_HELP = "hub commit sha, tag or branch to read --model at (the manifest records the commit it resolved to)"


DEMO_PROMPT = "How do I plant tomatoes?"  # the tiny model's strongest ground: HH-style advice
DESCRIPTION = (
    "Turn StableLM-Tuned-Alpha checkpoints (GPT-NeoX, 3B / 7B) into GPTQ 4-bit and ONNX artifacts that vLLM, "
    "transformers, ONNX Runtime and onnxruntime-genai load, and measure what each costs and loses against the "
    "PyTorch fp16 reference: perplexity, KL divergence, top-1 agreement, prefill / decode speed, memory."
)
EXAMPLES = """main commands:
  quantkit demo                                      the built-in tiny StableLM end to end
  quantkit generate --model tiny --prompt "What is GPTQ?"
  quantkit export --fmt gptq --model stabilityai/stablelm-tuned-alpha-7b --out stablelm-7b-gptq
  quantkit export --fmt onnx --model /models/stablelm-tuned-alpha-3b --out stablelm-3b-onnx
  quantkit run recipes/stablelm-tuned-alpha-7b-gptq-4bit.toml    export, validate, evaluate, benchmark, table
  quantkit eval --model ARTIFACT --data wikitext2-test --reference SOURCE
  quantkit verify ARTIFACT                           re-hash it and check what its loaders expect
run `quantkit COMMAND --help` for a command's options."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line: `error: ...`, exit 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {self.prog}: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N: the devices every backend runs on."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device '{text}' (expected cpu, cuda or cuda:N)")
    return text


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--revision", help=REVISION_HELP)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="PyTorch dtype (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    from quantkit.chat import CARD_MAX_NEW_TOKENS, CARD_TEMPERATURE, STABLELM_SYSTEM_PROMPT

    parser.add_argument("--system", default=STABLELM_SYSTEM_PROMPT, help="system prompt (default: the model card's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=CARD_MAX_NEW_TOKENS, help="default: %(default)s")
    parser.add_argument("--fit-context", action="store_true",
                        help="cap --max-new-tokens to what the model's positions leave beside the prompt (stop "
                             "reason: context) instead of refusing the request")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--greedy", action="store_true", help="argmax decoding")
    group.add_argument("--temperature", type=float, default=CARD_TEMPERATURE, help="default: %(default)s (the card's)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="quantkit", description=DESCRIPTION, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="end to end on the built-in tiny StableLM: chat, export, eval, bench, table")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="the question (default: %(default)s)")
    demo.add_argument("--out", default="out", help="working folder for artifacts (default: %(default)s)")
    demo.add_argument("--results", default="benchmarks/results", help="where the table goes (default: %(default)s)")

    generate = commands.add_parser("generate", help="one chat answer, with timings")
    add_model_args(generate)
    generate.add_argument("--prompt", required=True, help="the user's message")
    add_sampling_args(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    chat = commands.add_parser("chat", help="interactive multi-turn chat, streaming")
    add_model_args(chat)
    add_sampling_args(chat)
    evaluate = commands.add_parser(
        "eval", help="perplexity, and KL divergence / top-1 agreement vs a reference",
        description="Perplexity by a pinned method: the text tokenized once as published, windows of --window "
        "tokens every --stride tokens, each token after the first scored exactly once; dialogues in the StableLM "
        "prompt format with only assistant tokens scored. With --reference: KL divergence, top-1 agreement and "
        "change in the correct token's probability on the first --kld-tokens scored tokens.")
    add_model_args(evaluate)
    add_eval_args(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    bench = commands.add_parser("bench", help="prefill/decode tokens/s, TTFT, memory, %% of bandwidth roofline")
    add_model_args(bench)
    add_bench_args(bench)
    bench.add_argument("--reference", help="also benchmark this model and print the speed-up")
    bench.add_argument("--best", action="store_true",
                       help="artifact folder: time decode on every engine path it runs on here (validated exports "
                            "included) and name the fastest")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    report = commands.add_parser("report", help="eval + bench for several models: JSON, Markdown table and plot")
    report.add_argument("--models", nargs="+", required=True, help="the reference first, then artifacts")
    report.add_argument("--name", required=True, help="writes RESULTS/NAME.json, .md and .png")
    report.add_argument("--results", default="benchmarks/results", help="output folder (default: %(default)s)")
    report.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="PyTorch dtype of non-artifact models")
    report.add_argument("--device", type=device_name, help="cpu or cuda")
    add_eval_args(report, reference=False)
    add_bench_args(report)
    export = commands.add_parser("export", help="write a GPTQ or ONNX artifact folder",
                                 description="Export a checkpoint. Nothing appears at --out unless the export succeeds.")
    export.add_argument("--fmt", required=True, choices=list(FORMATS),
                        help="; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()))
    export.add_argument("--model", required=True, help=MODEL_HELP + "; for onnx-int4 also a GPTQ artifact folder")
    export.add_argument("--revision", help=REVISION_HELP)
    export.add_argument("--out", required=True, help="artifact folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--device", type=device_name, help="cuda (default when present) or cpu")
    gptq = export.add_argument_group("gptq / onnx-int4")
    gptq.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="rtn = round-to-nearest baseline")
    gptq.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    gptq.add_argument("--group-size", type=int, default=128, help="-1 = one group per column (default: %(default)s)")
    gptq.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False, help="act-order")
    gptq.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric (--no-sym: asymmetric)")
    gptq.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    gptq.add_argument("--damp", type=float, default=0.01, help="dampening fraction of the mean Hessian diagonal")
    gptq.add_argument("--calib", action="append", help="calibration dataset spec[:weight], repeatable "
                      "(default: wikitext2-valid; tiny-train for the tiny presets)")
    gptq.add_argument("--calib-samples", type=positive_int, default=128)
    gptq.add_argument("--calib-seqlen", type=positive_int, default=512)
    gptq.add_argument("--seed", type=int, default=0)
    gptq.add_argument("--force-calib-split", dest="allow_eval_split", action="store_true",
                      help="allow calibrating on a test/eval split")
    onnx = export.add_argument_group("onnx / onnx-int4")
    onnx.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                      help="graph dtype: fp16 for CUDA, fp32 for ONNX Runtime's CPU provider (default: %(default)s)")
    onnx.add_argument("--accuracy-level", type=int, choices=range(5), default=0,
                      help="onnx-int4: MatMulNBits compute type, 4 = int8 activations (default: %(default)s)")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--no-validate", dest="validate", action="store_false", help="skip ORT-vs-PyTorch validation")

    run = commands.add_parser("run", help="recipe(s) end to end: export, validate, eval, bench, table")
    run.add_argument("recipes", nargs="+", help="recipe TOML files (one table; they must share source and settings)")
    run.add_argument("--out", default="out", help="working folder for artifacts and stage records (default: %(default)s)")
    run.add_argument("--results", default="benchmarks/results", help="where the table goes (default: %(default)s)")
    run.add_argument("--name", help="table name (default: the first recipe's name)")
    run.add_argument("--force", action="store_true", help="re-run every stage")
    run.add_argument("--model", help="replace the recipes' source (e.g. a local folder instead of the hub id)")
    run.add_argument("--revision", help="pin the recipes' hub source (or --model's) to this commit sha or tag")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a recipe value, checked like the file's own (repeatable), e.g. "
                          "--set 'eval.data=wikitext2-test[:20000]' --set 'bench.batches=[1]'")

    verify = commands.add_parser("verify", help="re-hash an artifact folder against its manifest")
    verify.add_argument("folder")
    return parser


def add_eval_args(parser: argparse.ArgumentParser, reference: bool = True) -> None:
    from quantkit.data import KNOWN_SPECS
    from quantkit.report import DEFAULT_WINDOW, KLD_TOKENS

    parser.add_argument("--data", required=True,
                        help=f"{', '.join(KNOWN_SPECS)}, a .txt/.raw/.json/.jsonl(.gz) file, or hub:NAME[:SPLIT]")
    if reference:
        parser.add_argument("--reference", help="model to compare against (its log-probs are cached)")
    parser.add_argument("--window", type=positive_int, help=f"tokens per window (default: min({DEFAULT_WINDOW}, model positions))")
    parser.add_argument("--stride", type=positive_int, help="tokens between window starts (default: window / 4)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward (default: %(default)s)")
    parser.add_argument("--kld-tokens", type=positive_int, default=KLD_TOKENS,
                        help="scored tokens compared with the reference (default: %(default)s)")


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    from quantkit.bench import DECODE_BATCHES, PROMPT_LENGTHS

    parser.add_argument("--prompt-lengths", nargs="+", type=positive_int, default=list(PROMPT_LENGTHS),
                        help="prefill lengths, capped by the model (default: %(default)s)")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=list(DECODE_BATCHES),
                        help="decode batch sizes (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=positive_int, default=64, help="default: %(default)s")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs after a warm-up (default: %(default)s)")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the roofline (default: measured by a copy test)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except QuantkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input: a full disk or an unwritable path mid-way
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    from quantkit import app
    from quantkit.sources import with_revision

    if args.command != "run" and getattr(args, "revision", None):
        args.model = with_revision(args.model, args.revision)

    if args.command == "demo":
        return app.demo(args.prompt, args.out, args.results)
    if args.command == "generate":
        result = app.generate_answer(args)
        print(json.dumps(result, indent=2) if args.json else "")
        return 0
    if args.command == "chat":
        return app.chat(args)
    if args.command == "eval":
        return app.print_record(app.evaluate(args), args.json)
    if args.command == "bench":
        return app.print_record(app.bench(args), args.json)
    if args.command == "report":
        return app.report(args)
    if args.command == "export":
        return app.export(args)
    if args.command == "run":
        return app.run_recipes(args)
    if args.command == "verify":
        return app.verify(args.folder)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
