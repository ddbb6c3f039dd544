"""Fixtures for the downstream suite (`tests_downstream/`): the tiny model's artifacts exported by quantkit's own
code, deliberately broken copies, and what quantkit's own backends say about each, in `expected.json`.

    python -m quantkit.serving_check OUT_DIR

The consumers (vLLM, optimum's ORTModelForCausalLM, onnxruntime-genai) cannot share quantkit's environment, so
they read these numbers instead of running quantkit. Per artifact `expected.json` holds: the folder and format;
teacher-forced windows of held-out text (token ids) and quantkit's backend log-prob of every scored token, by the
shared scorer of `quantkit.evaluate` (for GPTQ also the exactly dequantized checkpoint's); chat cases (messages,
the prompt `render_prompt` renders and its token ids, the runner's greedy continuation and the top-1/top-2 logit
margin at each step); the stop ids. A broken copy names the good artifact whose numbers it must fail to match.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from quantkit.backends import open_backend
from quantkit.backends.base import Backend
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import STABLELM_SYSTEM_PROMPT, render_prompt, stop_token_ids
from quantkit.data import load_dataset
from quantkit.errors import QuantkitError
from quantkit.evaluate import Method, Segment, scored_logprobs, segments_for
from quantkit.export.gptq_layout import BITS, dequantized_model, unpack_nibbles
from quantkit.export.onnx import Recorder
from quantkit.formats import FORMATS
from quantkit.runner import generate
from quantkit.sources import load_tokenizer, model_folder

MODEL = "tiny"
DATASET = "tiny-heldout"
WINDOWS = 8
# stride = window - 1: every window scores all but its first token, so a consumer scores a window on its own.
METHOD = Method(window=128, stride=127, batch_size=WINDOWS)
CONTINUATION = 32
# Export options per format (the registry's option names); the int4 export takes the GPTQ folder as it is.
OPTIONS = {"gptq": {"group_size": 128, "calib_samples": 32, "calib_seqlen": 256, "device": "cpu"},
           "onnx": {"dtype": "fp16", "device": "cpu"}, "onnx-int4": {"dtype": "fp16", "device": "cpu"}}
WRONG_ROTARY_PCT = 0.5  # the tiny model (like StableLM-Alpha) rotates 25 % of each head
Messages = list[dict[str, str]]
CHATS: dict[str, Messages] = {
    "card-system": [{"role": "user", "content": "Explain the assert statement."}],
    "system-multi-turn": [
        {"role": "system", "content": "You answer in one line.\n"},
        {"role": "user", "content": "Explain pass."},
        {"role": "assistant", "content": "It does nothing."},
        {"role": "user", "content": "Explain the del statement."},
    ],
}


def render_messages(messages: Messages) -> str:
    """The prompt `render_prompt` makes of OpenAI-style messages: an optional leading system message, then
    alternating user/assistant turns ending in a user turn."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else STABLELM_SYSTEM_PROMPT
    turns = [m["content"] for m in messages if m["role"] != "system"]
    history = list(zip(turns[:-1:2], turns[1:-1:2]))
    return render_prompt(turns[-1], system=system, history=history)


# ---- artifacts ---------------------------------------------------------------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    """`src` copied to `dst` without its manifest (a broken copy no longer matches it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("quantkit.json"))
    return dst


def pack_nibbles(fields: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `unpack_nibbles`: 4-bit fields along `dim` (0 or 1), lowest first, into int32 words."""
    fields = fields.long().movedim(dim, -1)
    words = (fields.reshape(*fields.shape[:-1], -1, 32 // BITS) << torch.arange(0, 32, BITS)).sum(-1)
    return (words - (words >= 1 << 31).long() * (1 << 32)).to(torch.int32).movedim(-1, dim).contiguous()


def shift_zero_points(qzeros: torch.Tensor) -> torch.Tensor:
    """Every stored zero point one higher (mod 16): what reading v2 zeros as v1 does."""
    return pack_nibbles((unpack_nibbles(qzeros, 1).long() + 1) % (1 << BITS), 1)


def reverse_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """The 8 weights of each word in the other order: a packer that writes high nibble first."""
    fields = unpack_nibbles(qweight, 0)
    return pack_nibbles(fields.view(-1, 32 // BITS, fields.shape[1]).flip(1).reshape(fields.shape), 0)


def break_gptq(gptq: Path, dst: Path, field: str, defect: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """A copy of the GPTQ folder with `defect` applied to every `.{field}` tensor."""
    copy_folder(gptq, dst)
    for file in dst.glob("*.safetensors"):
        tensors = {k: defect(v) if k.endswith(f".{field}") else v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return dst


def break_rotary(folder: Path, dst: Path) -> Path:
    """A copy of the checkpoint folder whose config.json gives the wrong rotary fraction (both spellings)."""
    copy_folder(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rotary_pct"] = WRONG_ROTARY_PCT
    if "rope_parameters" in config:
        config["rope_parameters"]["partial_rotary_factor"] = WRONG_ROTARY_PCT
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def export(fmt: str, source: Path | str, out: Path) -> Path:
    """`source` exported to `out` by the format registry's exporter, with the suite's options."""
    FORMATS[fmt].export(str(source), out, OPTIONS[fmt], False, None)
    return out


def export_all(out: Path) -> dict[str, dict]:
    """Every artifact folder under `out` -> {format, folder, broken_of?, defect?}; good ones first."""
    dense = copy_folder(model_folder(MODEL), out / "dense")
    gptq = export("gptq", MODEL, out / "gptq")
    dense_rotary = break_rotary(dense, out / "dense-wrong-rotary")
    gptq_zeros = break_gptq(gptq, out / "gptq-zeros-off-by-one", "qzeros", shift_zero_points)
    return {
        "dense": {"format": "dense", "folder": dense},
        "gptq": {"format": "gptq", "folder": gptq},
        "onnx-fp16": {"format": "onnx", "folder": export("onnx", MODEL, out / "onnx-fp16")},
        "onnx-int4": {"format": "onnx-int4", "folder": export("onnx-int4", gptq, out / "onnx-int4")},
        "dense-wrong-rotary": {"format": "dense", "folder": dense_rotary, "broken_of": "dense",
                               "defect": f"config.json rotary_pct {WRONG_ROTARY_PCT}"},
        # vLLM reads no zero points from a symmetric checkpoint (its kernels assume 2^(bits-1)): it is shown the
        # packing bug below; the zero-point bug reaches MatMulNBits through the int4 ONNX export.
        "gptq-zeros-off-by-one": {"format": "gptq", "folder": gptq_zeros, "broken_of": "gptq",
                                  "defect": "every qzeros field + 1"},
        "gptq-nibbles-reversed": {"format": "gptq", "broken_of": "gptq", "defect": "qweight packed high nibble first",
                                  "folder": break_gptq(gptq, out / "gptq-nibbles-reversed", "qweight", reverse_nibbles)},
        # Exported by quantkit from the broken sources: each graph is right for its (wrong) weights and config.
        "onnx-fp16-wrong-rotary": {"format": "onnx", "broken_of": "onnx-fp16", "defect": "exported from dense-wrong-rotary",
                                   "folder": export("onnx", dense_rotary, out / "onnx-fp16-wrong-rotary")},
        "onnx-int4-zeros-off-by-one": {"format": "onnx-int4", "broken_of": "onnx-int4",
                                       "defect": "exported from gptq-zeros-off-by-one",
                                       "folder": export("onnx-int4", gptq_zeros, out / "onnx-int4-zeros-off-by-one")},
    }


# ---- what quantkit says about an artifact ------------------------------------------------------------------------


def windows(backend: Backend) -> list[Segment]:
    """The first WINDOWS teacher-forced windows of the held-out text, as the shared scorer cuts them."""
    segments = segments_for(backend, load_dataset(DATASET), METHOD)[:WINDOWS]
    if any(s.scored[1:] != [True] * (len(s.ids) - 1) for s in segments):
        raise QuantkitError("a window must score every token but its first")
    return segments


def token_logprobs(backend: Backend, segments: list[Segment], rows: int | None = None) -> list[list[float]]:
    """log p(token | earlier tokens of its window) for every token but each window's first, by the shared scorer,
    normalized over the tokenizer's ids (or over `rows` logit rows)."""
    batches = scored_logprobs(backend, segments, METHOD, rows=rows)
    picked = [lp.gather(1, t[:, None]).squeeze(1) for lp, t in batches]
    flat = iter(torch.cat(picked).tolist())
    return [[next(flat) for _ in s.ids[1:]] for s in segments]


def margins(logits: list[torch.Tensor], vocab: int) -> list[float]:
    """Top-1 minus top-2 logit over the tokenizer's ids, per greedy step (row 0)."""
    tops = [step[0, :vocab].topk(2).values for step in logits]
    return [float(top[0] - top[1]) for top in tops]


def chat_case(backend: Backend, messages: Messages, stops: list[int]) -> dict:
    """The prompt and the runner's greedy continuation with the margin of every step."""
    prompt = render_messages(messages)
    ids = backend.tokenizer(prompt)["input_ids"]
    recorder = Recorder(vocab_limit=len(backend.tokenizer))
    result = generate(backend, [ids], CONTINUATION, recorder, stops)[0]
    return {"messages": messages, "prompt": prompt, "prompt_ids": ids, "tokens": result.token_ids,
            "stop_token": result.stop_token, "margins": margins(recorder.logits, len(backend.tokenizer))}


def scores(backend: Backend, segments: list[Segment]) -> dict:
    """The log-probs over the tokenizer's ids (quantkit's method) and over every logit row (what vLLM reports)."""
    return {"backend": backend.name, "logprobs": token_logprobs(backend, segments),
            "logprobs_all_rows": token_logprobs(backend, segments, rows=backend.vocab_rows)}


def describe(backend: Backend, segments: list[Segment]) -> dict:
    stops = stop_token_ids(backend.tokenizer)
    return {**scores(backend, segments), "windows": [s.ids for s in segments], "stop_ids": stops,
            "vocab": len(backend.tokenizer),
            "chats": {name: chat_case(backend, m, stops) for name, m in CHATS.items()}}


def dequantized_backend(folder: Path) -> TorchBackend:
    model = dequantized_model(folder, torch.float32, "cpu")
    return TorchBackend(model, load_tokenizer(folder), name="gptq-dequantized-fp32")


def expected_for(artifact: dict) -> dict:
    """The expected.json entry of one artifact (broken copies carry no numbers of their own)."""
    entry = {**artifact, "folder": artifact["folder"].name}
    if artifact["format"] in FORMATS:  # the dense source checkpoint is no export format
        entry["consumers"] = list(FORMATS[artifact["format"]].consumers)
    if "broken_of" in entry:
        return entry
    backend = open_backend(str(artifact["folder"]), device="cpu")
    segments = windows(backend)
    entry |= describe(backend, segments)
    if artifact["format"] == "gptq":
        entry["reference"] = scores(dequantized_backend(artifact["folder"]), segments)
    return entry


def build(out: Path) -> Path:
    """Export every artifact into `out` (replacing what was there) and write `out/expected.json`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    artifacts = export_all(out)
    expected = {"model": MODEL, "dataset": DATASET, "method": asdict(METHOD), "windows": WINDOWS,
                "continuation": CONTINUATION,
                "artifacts": {name: expected_for(artifact) for name, artifact in artifacts.items()}}
    path = out / "expected.json"
    path.write_text(json.dumps(expected, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantkit.serving_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to (re)build: artifacts + expected.json")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
