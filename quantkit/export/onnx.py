"""`quantkit export --fmt onnx`: a GPT-NeoX checkpoint -> an fp16 (or fp32) ONNX artifact folder, validated
against PyTorch with ONNX Runtime before it is published.

Folder: model.onnx, model.onnx.data (every weight, one sidecar), config.json, generation_config.json, tokenizer
files (with the chat template), genai_config.json (onnxruntime-genai), README.md (model card) and quantkit.json
(manifest). The graph contract is in onnx_graph.py.

Validation runs the shared runner (quantkit.runner.generate) on fixed chat prompts, at batch 1 and on a left-padded
batch of 3, with the PyTorch model in the export dtype and then with ONNX Runtime: all prefill logits, then 32
greedy decode steps. The ONNX run is teacher-forced with the reference's tokens so every step's logits stay
comparable; its own greedy picks must equal the reference's (which is what makes free-running generation equal).
"""
from __future__ import annotations

import functools
import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from quantkit.backends.base import Backend
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import Sampler, render_prompt
from quantkit.errors import QuantkitError
from quantkit.export import onnx_graph
from quantkit.export.genai import write_genai_config
from quantkit.export.artifact import (
    copy_tokenizer_files,
    ensure_free_space,
    staged_output,
    versions,
    write_config,
    write_generation_config,
    write_manifest,
)
from quantkit.runner import generate, left_pad
from quantkit.sources import (
    default_device,
    find_checkpoint,
    load_model,
    load_model_config,
    load_tokenizer,
    model_folder,
    read_pickle,
    source_record,
    weight_index,
)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
VALIDATION_QUESTIONS = (
    "Explain the assert statement.",
    "What does the with statement do?",
    "Tell me about integer literals and how Python parses them.",
)
VALIDATION_STEPS = 32
# transformers 5 renames GPT-NeoX's output head on load; checkpoints keep the original name.
CHECKPOINT_ALIASES = {"lm_head.weight": "embed_out.weight"}


@dataclass(frozen=True)
class OnnxOptions:
    dtype: str = "fp16"  # fp16 | fp32
    opset: int = 18
    device: str | None = None  # where validation runs (tracing needs no device); cuda when available
    validate: bool = True


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed |ONNX - PyTorch| logit: atol + rtol * the reference's largest |logit| in the same case."""

    atol: float
    rtol: float

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# fp32: ORT and PyTorch differ only in summation order: measured 8e-6 on the trained tiny model (logits up to 14)
# and 1.3e-5 on the 2-layer 3B shape.
# fp16: logits leave an fp16 lm_head, so they carry fp16 rounding, which grows with their size (an ulp is 1e-3 to
# 5e-4 of the value), and ORT's CPU kernels compute in fp32 where PyTorch rounds every fp16 op. Measured against
# torch fp16: 1.1e-2 at logit scale 14.2 on the trained tiny model (7.9e-4 of the scale), 5.8e-3 at 6.8 on the
# 2-layer 3B shape (8.6e-4); 2e-3 of the scale leaves about 2x headroom.
TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-5), "fp16": Tolerance(atol=1e-3, rtol=2e-3)}


@dataclass
class Source:
    """What the exporter reads: config, tokenizer and a weight reader; `model` when the weights live in memory."""

    config: GPTNeoXConfig
    tokenizer: PreTrainedTokenizerBase
    read: onnx_graph.WeightReader
    model: GPTNeoXForCausalLM | None = None


def checkpoint_reader(folder: Path) -> onnx_graph.WeightReader:
    """Reads one tensor at a time from the folder's safetensors, or its PyTorch pickles, sharded or not."""
    checkpoint = find_checkpoint(folder)
    files = weight_index(checkpoint)
    # A pickle is mapped whole: keep the one shard being read, so RSS stays at about one shard.
    shard = functools.lru_cache(maxsize=1)(read_pickle)

    def read(key: str) -> torch.Tensor:
        name = key if key in files else CHECKPOINT_ALIASES.get(key, key)
        if name not in files:
            raise QuantkitError(f"{folder} has no tensor '{key}'")
        if checkpoint.pickled:
            return shard(files[name])[name]
        # Open per tensor: a handle kept open keeps every page it touched mapped, so the process RSS would grow
        # to the whole checkpoint; closed, it stays at about one tensor.
        with safe_open(files[name], "pt") as handle:
            return handle.get_tensor(name)

    return read


def module_reader(model: torch.nn.Module) -> onnx_graph.WeightReader:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return lambda key: tensors[key].detach()


def open_source(spec: str, dtype: torch.dtype, device: str) -> Source:
    """Weights of a folder (tiny presets and hub snapshots included) are read lazily from its checkpoint. Random
    presets have none: their model is built in memory once, read from there, and reused as the validation
    reference (writing it to a temporary checkpoint first would cost the same RAM plus a disk copy)."""
    folder = model_folder(spec)
    if folder is None:
        model, tokenizer = load_model(spec, dtype=dtype, device=device)
        return Source(model.config, tokenizer, module_reader(model), model)
    return Source(load_model_config(spec), load_tokenizer(folder), checkpoint_reader(folder))


def parameter_bytes(config: GPTNeoXConfig, dtype: torch.dtype) -> int:
    model = onnx_graph.meta_model(config, dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_model_files(source: Source, folder: Path, options: OnnxOptions) -> None:
    """model.onnx + model.onnx.data, config, generation config and tokenizer files."""
    dtype = DTYPES[options.dtype]
    onnx_graph.export_graph(source.config, dtype, options.opset, source.read, folder)
    write_sidecar_files(source.config, source.tokenizer, folder, {"dtype": str(dtype).removeprefix("torch.")})


def write_sidecar_files(config: GPTNeoXConfig, tokenizer: PreTrainedTokenizerBase, folder: Path, extra: dict) -> None:
    """What an ONNX folder holds beside the graph: config.json (+ `extra` keys), generation config, tokenizer
    files with the chat template, and onnxruntime-genai's genai_config.json."""
    write_config(config, folder, extra=extra)
    write_generation_config(tokenizer, folder)
    copy_tokenizer_files(tokenizer, folder)
    write_genai_config(config, tokenizer, folder)


# ---- validation ------------------------------------------------------------------------------------------------


@dataclass
class Recorder(Sampler):
    """Greedy sampler that keeps every step's logits and picks; with `forced`, feeds those tokens back instead
    of its own picks (teacher forcing)."""

    forced: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    picks: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        pick = super().__call__(logits)
        self.logits.append(logits.float().cpu())
        self.picks.append(pick.cpu())
        return pick if self.forced is None else self.forced[len(self.picks) - 1].to(pick.device)


@dataclass
class CaseRun:
    """One backend on one batch of prompts: prefill logits of every position, then each generate step's."""

    prompts: list[list[int]]
    prefill: torch.Tensor  # [B, T, V]
    real: torch.Tensor  # [B, T] bool, False on left padding
    steps: list[torch.Tensor]  # [B, V] per step; step 0 is the prefill's last position
    picks: list[torch.Tensor]  # [B] greedy token per step


def validation_cases(tokenizer: PreTrainedTokenizerBase) -> list[list[list[int]]]:
    """Batch 1, and a left-padded batch of 3 chat prompts of different lengths."""
    prompts = [tokenizer(render_prompt(q))["input_ids"] for q in VALIDATION_QUESTIONS]
    return [prompts[:1], prompts]


class PrefillCapture:
    """A backend that also keeps the prefill's logits at every position (the runner asks for the last only)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.prefill: torch.Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def forward(self, input_ids, position_ids, attention_mask, cache, last_only=True):
        if self.prefill is not None:
            return self.backend.forward(input_ids, position_ids, attention_mask, cache, last_only)
        logits, cache = self.backend.forward(input_ids, position_ids, attention_mask, cache, last_only=False)
        self.prefill = logits.float().cpu()
        return logits[:, -1:], cache


def run_case(backend: Backend, prompts: list[list[int]], forced: list[torch.Tensor] | None = None) -> CaseRun:
    """The shared runner over prefill + VALIDATION_STEPS decode steps, recording every step's logits."""
    capture = PrefillCapture(backend)
    recorder = Recorder(vocab_limit=len(backend.tokenizer), forced=forced)
    generate(capture, prompts, VALIDATION_STEPS + 1, recorder, stop_ids=[])
    real = left_pad(prompts, 0, "cpu")[1].bool()
    return CaseRun(prompts, capture.prefill, real, recorder.logits, recorder.picks)


def record_reference(backend: Backend) -> list[CaseRun]:
    """The reference runs; recorded first, so the reference model can be freed before ONNX Runtime loads."""
    return [run_case(backend, prompts) for prompts in validation_cases(backend.tokenizer)]


def all_finite(run: CaseRun) -> bool:
    return bool(torch.isfinite(run.prefill).all()) and all(bool(torch.isfinite(s).all()) for s in run.steps)


def compare_case(expected: CaseRun, actual: CaseRun, tolerance: Tolerance) -> dict:
    """Figures for one case, and its problems (empty when it passes)."""
    scale = max(expected.prefill[expected.real].abs().max().item(), *(s.abs().max().item() for s in expected.steps))
    limit = tolerance.limit(scale)
    prefill_diff = (actual.prefill - expected.prefill)[expected.real].abs().max().item()
    step_diffs = [(a - e).abs().max().item() for a, e in zip(actual.steps, expected.steps)]
    finite = all_finite(actual)
    equal_steps, near_ties, wrong = 0, [], []
    for step, (ref_logits, ref_pick, pick) in enumerate(zip(expected.steps, expected.picks, actual.picks)):
        differs = (pick != ref_pick).nonzero().flatten().tolist()
        equal_steps += not differs
        for row in differs:
            # Two tokens whose reference logits are within the tolerance are a tie: either pick is right.
            margin = (ref_logits[row, ref_pick[row]] - ref_logits[row, pick[row]]).item()
            if margin <= limit:
                near_ties.append(margin)
            else:
                wrong.append(f"step {step} row {row}: token {pick[row].item()} instead of {ref_pick[row].item()}")
    figures = {
        "batch": expected.real.shape[0],
        "prompt_tokens": expected.real.sum(-1).tolist(),
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": max(step_diffs[1:]),
        "logit_scale": scale,
        "limit": limit,
        "greedy_equal_steps": equal_steps,
        "steps": len(expected.steps),
        "near_ties": near_ties,  # the reference's top-1 margin over the token picked instead, per flip
        "finite": finite,
    }
    problems = [] if finite else ["NaN or inf in the ONNX logits"]
    problems += [] if all_finite(expected) else ["NaN or inf in the PyTorch reference logits"]
    worst = max(prefill_diff, *step_diffs)
    if worst > limit:
        problems.append(f"max |logit diff| {worst:.3g} > tolerance {limit:.3g}")
    problems += [f"greedy token differs at {w}" for w in wrong]
    return {**figures, "problems": problems}


def check_artifact(candidate: Backend, expected: list[CaseRun], tolerance: Tolerance) -> dict:
    """Run the artifact on the reference's cases (teacher-forced) and compare; returns the validation record."""
    cases = []
    for reference in expected:
        cases.append(compare_case(reference, run_case(candidate, reference.prompts, reference.picks), tolerance))
    problems = [f"batch {c['batch']}: {p}" for c in cases for p in c["problems"]]
    return {
        "passed": not problems,
        "runtime": f"{candidate.name} ({candidate.device})",
        "steps": VALIDATION_STEPS,
        "tolerance": asdict(tolerance),
        "max_abs_diff": max(max(c["prefill_max_abs_diff"], c["decode_max_abs_diff"]) for c in cases),
        "cases": cases,
        "problems": problems,
    }


# ---- artifact ----------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The PyTorch reference's label and its recorded runs."""

    name: str
    runs: list[CaseRun]


def write_and_record(spec: str, folder: Path, options: OnnxOptions, device: str) -> tuple[int, Reference | None]:
    """Write the model files; then, when validating, run the PyTorch reference. Returns the weight bytes and the
    reference runs; the source model is freed on return, before ONNX Runtime loads the artifact."""
    dtype = DTYPES[options.dtype]
    source = open_source(spec, dtype, device)
    weight_bytes = parameter_bytes(source.config, dtype)
    ensure_free_space(folder, int(weight_bytes * 1.05) + 2**26)
    write_model_files(source, folder, options)
    if not options.validate:
        return weight_bytes, None
    model = source.model or load_model(spec, dtype=dtype, device=device)[0]
    backend = TorchBackend(model, source.tokenizer, name=f"torch-{options.dtype}")
    return weight_bytes, Reference(f"{backend.name} ({backend.device})", record_reference(backend))


def validate_artifact(folder: Path, reference: Reference, options: OnnxOptions, device: str, out: Path) -> dict:
    """The validation record; raises QuantkitError when the artifact fails it."""
    from quantkit.backends.onnxrt import OnnxBackend

    record = {"reference": reference.name}
    record |= check_artifact(OnnxBackend(folder, device=device), reference.runs, TOLERANCES[options.dtype])
    if not record["passed"]:
        more = f" (+{len(record['problems']) - 1} more)" if len(record["problems"]) > 1 else ""
        raise QuantkitError(f"ONNX validation failed: {record['problems'][0]}{more}; nothing was written to {out}")
    return record


def export_onnx(model: str, out: Path, options: OnnxOptions, *, overwrite: bool = False,
                manifest_extra: dict | None = None) -> Path:
    """Export, validate (unless options.validate is False) and publish the artifact folder at `out`."""
    if options.dtype not in DTYPES:
        raise QuantkitError(f"unsupported ONNX dtype '{options.dtype}' (expected one of {', '.join(DTYPES)})")
    device = options.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device}: PyTorch sees no CUDA GPU (validation runs the model there)")
    out = Path(out)
    started = time.perf_counter()
    try:
        with staged_output(out, overwrite) as staging:
            weight_bytes, reference = write_and_record(model, staging, options, device)
            gc.collect()  # the source model, when it was in memory
            validation = {"skipped": True} if reference is None else validate_artifact(staging, reference, options,
                                                                                       device, out)
            metrics = {"seconds": round(time.perf_counter() - started, 1), "weight_bytes": weight_bytes,
                       "data_bytes": (staging / onnx_graph.DATA_FILE).stat().st_size}
            (staging / "README.md").write_text(model_card(model, options, validation, metrics))
            write_manifest(staging, {"format": "onnx", "source": source_record(model), "options": asdict(options),
                                     "versions": versions(), "validation": validation, "metrics": metrics,
                                     **(manifest_extra or {})})
    except OSError as exc:  # a full disk or a permission problem while writing: one line, nothing at `out`
        raise QuantkitError(f"ONNX export to {out} failed: {exc}") from None
    return out


def validation_section(validation: dict) -> str:
    if validation.get("skipped"):
        return "Not validated (exported with `--no-validate`).\n"
    rows = "".join(
        f"| {c['batch']} | {c['prompt_tokens']} | {c['prefill_max_abs_diff']:.2g} | {c['decode_max_abs_diff']:.2g} "
        f"| {c['limit']:.2g} | {c['greedy_equal_steps']}/{c['steps']} | {len(c['near_ties'])} |\n"
        for c in validation["cases"]
    )
    tolerance = validation["tolerance"]
    return (
        f"**Passed.** {validation['runtime']} against {validation['reference']}: chat prompts, all prefill logits "
        f"and {validation['steps']} greedy decode steps through quantkit's runner (ONNX teacher-forced with the "
        f"reference's tokens). Tolerance: {tolerance['atol']:g} + {tolerance['rtol']:g} x the largest |logit|; "
        "no NaN/inf.\n\n"
        "| batch | prompt tokens | prefill max abs diff | decode max abs diff | limit | greedy equal | near ties |\n"
        "|---|---|---|---|---|---|---|\n" + rows
    )


def model_card(source: str, options: OnnxOptions, validation: dict, metrics: dict) -> str:
    dtype = options.dtype
    kv = "np.float16" if dtype == "fp16" else "np.float32"
    return f"""# {Path(source).name} — ONNX ({dtype})

Exported by quantkit from `{source}` with `torch.onnx.export(dynamo=True)`, opset {options.opset}. GPT-NeoX
(StableLM-Tuned-Alpha architecture) with KV cache; {dtype} weights and KV cache, fp32 attention scores/softmax,
fp32 logits. Weights: {metrics["weight_bytes"] / 2**30:.2f} GiB in `model.onnx.data`.

Prompt format: `<|SYSTEM|>{{system}}<|USER|>{{message}}<|ASSISTANT|>`; stop on `<|USER|>`, `<|ASSISTANT|>`,
`<|SYSTEM|>`, `<|padding|>`, `<|endoftext|>` (the `eos_token_id` list in generation_config.json).

## Files
`model.onnx` (graph) and `model.onnx.data` (all weights, found beside it), `config.json`, `generation_config.json`,
tokenizer files, `quantkit.json` (options, library versions, validation, sha256 of every file).

## Graph
One graph for prefill and decode; batch, sequence and past length are dynamic (past may be 0).

| | name | shape | type |
|---|---|---|---|
| in | `input_ids` | [batch, seq] | int64 |
| in | `attention_mask` | [batch, past + seq] (0 = left padding) | int64 |
| in | `position_ids` | [batch, seq] (count real tokens only) | int64 |
| in | `past_key_values.{{i}}.key` / `.value` | [batch, heads, past, head_dim] | {dtype} |
| out | `logits` | [batch, seq, vocab_rows] | fp32 |
| out | `present.{{i}}.key` / `.value` | [batch, heads, past + seq, head_dim] | {dtype} |

## ONNX Runtime
```python
import numpy as np, onnxruntime as ort
from transformers import AutoConfig, AutoTokenizer

folder = "path/to/this/folder"
config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
session = ort.InferenceSession(f"{{folder}}/model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
ids = tokenizer("<|SYSTEM|>You are helpful.<|USER|>Hi!<|ASSISTANT|>", return_tensors="np")["input_ids"]
heads = config.num_attention_heads
past = np.zeros((1, heads, 0, config.hidden_size // heads), {kv})
feed = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}}
feed |= {{f"past_key_values.{{i}}.{{kv}}": past for i in range(config.num_hidden_layers) for kv in ("key", "value")}}
logits, *present = session.run(None, feed)
# next step: feed the new token, the mask grown by one column, position + 1, and present[2i], present[2i+1]
# as past_key_values.{{i}}.key / .value.
```

## optimum
```python
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

model = ORTModelForCausalLM.from_pretrained("path/to/this/folder", provider="CUDAExecutionProvider", use_io_binding=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
inputs = tokenizer("<|SYSTEM|>You are helpful.<|USER|>Hi!<|ASSISTANT|>", return_tensors="pt").to("cuda")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```
The graph uses the input and output names ORTModelForCausalLM expects (quantkit's own tests do not run optimum).
Or with quantkit: `quantkit generate --model path/to/this/folder --prompt "Hi!"`.

ONNX Runtime's CPU provider has no fp16 kernels for most ops: it keeps fp32 copies of the weights (about 2x the
fp16 weight bytes in RAM) and computes in fp32. The fp16 artifact runs on CPU, but is meant for
CUDAExecutionProvider.

## Validation
{validation_section(validation)}"""
