"""GPTQ (or round-to-nearest) 4-bit export with gptqmodel, written as a portable classic GPTQ checkpoint.

gptqmodel quantizes the model layer by layer (offloading finished layers to disk). Its output is rewritten
into the layout every GPTQ loader reads (auto-gptq / transformers + optimum / vLLM / TGI): `checkpoint_format`
gptq (v1 zero points), the source checkpoint's tensor names (head `embed_out.weight`), fp16 for everything not
quantized, quantization settings at the top level of `quantization_config`, and the source's tokenizer files
unchanged. Held-out perplexity of the source and the artifact is measured at export and goes into the model card
and the manifest. Nothing appears at `out` unless the whole export succeeds.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from quantkit.agreement import Agreement
from quantkit.attention import ATTN_IMPLEMENTATION
from quantkit.backends import open_backend
from quantkit.backends.gptq import BITS, open_gptq
from quantkit.calib import (
    DEFAULT_CALIB,
    CalibSource,
    calibration_samples,
    default_calib,
    load_calibration,
    parse_calib_spec,
)
from quantkit.data import Dataset, load_dataset
from quantkit.errors import QuantkitError
from quantkit.evaluate import perplexity
from quantkit.export.artifact import (
    copy_tokenizer_files,
    ensure_free_space,
    staged_output,
    versions,
    write_config,
    write_generation_config,
    write_manifest,
)
from quantkit.paths import cache_dir, data_dir
from quantkit.report import method_for
from quantkit.sources import (
    TINY_PRESETS,
    Checkpoint,
    default_device,
    find_checkpoint,
    load_model,
    load_tokenizer,
    model_folder,
    parse_spec,
    read_pickle,
    source_record,
    weight_index,
)

METHODS = ("gptq", "rtn")
QUANTIZE_BATCH = 16  # rows per calibration forward: same bytes as smaller batches, fewer slow hooked passes
MAX_SHARD_SIZE = "4GB"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
BLOCK_PACK_MIN_PARAMS = 10**9  # below this, packing is seconds and not worth gptqmodel's 2-minute g++ build
QUALITY_CHARS = 4000  # held-out slice measured at export: ~1000 tokens (3.5 min at 3B width, 2 layers, 2 CPU cores)
WORK = "work"  # scratch folder inside the staging folder, removed before the rename
LICENSE = "cc-by-nc-sa-4.0"


@dataclass(frozen=True)
class GptqOptions:
    method: str = "gptq"  # gptq | rtn
    bits: int = 4  # 2, 3, 4, 8
    group_size: int = 128  # -1 = per column
    desc_act: bool = False
    sym: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    calib: tuple[str, ...] = DEFAULT_CALIB  # quantkit.data specs, optional ":weight" suffix
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    device: str | None = None  # cuda when available, else cpu
    allow_eval_split: bool = False  # --force-calib-split

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantkitError(f"method must be gptq or rtn, got '{self.method}'")
        if self.bits not in BITS:
            raise QuantkitError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if not (self.group_size == -1 or (self.group_size >= 16 and self.group_size & (self.group_size - 1) == 0)):
            raise QuantkitError(f"group size must be -1 or a power of two >= 16, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise QuantkitError(f"damp must be in (0, 1), got {self.damp}")
        if self.calib_samples < 1 or self.calib_seqlen < 1:
            raise QuantkitError("calibration samples and sequence length must be >= 1")
        if self.seed < 0:
            raise QuantkitError(f"seed must be >= 0, got {self.seed}")
        if self.method == "rtn" and self.desc_act:
            raise QuantkitError("act-order (desc_act) needs the gptq method: round-to-nearest has no Hessian")
        if not self.calib:
            raise QuantkitError("no calibration dataset given")
        for spec in self.calib:
            parse_calib_spec(spec)


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[phase] = round(time.perf_counter() - start, 2)


@functools.cache
def gptqmodel_api():
    """(GPTQModel, QuantizeConfig), imported once and set up for GPT-NeoX under transformers 5 (gptqmodel 7.7)."""
    cache = cache_dir()
    # Its CPU pool defaults to (cores + 1) // 2 workers, and loading needs two: on 2 cores GPTQModel.load fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 2) + 1) // 2)))
    # Compiled packing kernels go in quantkit's cache, where they survive between exports.
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache / "gptqmodel-ext"))
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper import loop_processor
    from gptqmodel.models import auto
    from gptqmodel.models.definitions.gpt_neox import GPTNeoXQModel

    # Each quantize writes logs to the relative path ./logs (no setting for it): keep them out of the cwd.
    loop_processor._PROJECT_LOG_DIR = cache / "gptqmodel-logs"

    class NeoXQModel(GPTNeoXQModel):
        """transformers 5 calls the head `lm_head` and registers the checkpoint's `embed_out` -> `lm_head` rename
        under the class name; gptqmodel looks renames up by model_type, so without the alias its lazy
        checkpoint reader never finds the head and save() fails."""

        lm_head = "lm_head"
        hf_conversion_model_type_alias = "GPTNeoXForCausalLM"

    auto.MODEL_MAP["gpt_neox"] = NeoXQModel
    return GPTQModel, QuantizeConfig


def source_folder(model: str, work: Path) -> tuple[Path, PreTrainedTokenizerBase]:
    """A Hugging Face folder of `model` for gptqmodel to read, and the source tokenizer. Safetensors folders (tiny
    presets and hub snapshots included) are read in place, pickle folders as a safetensors copy; random presets
    and `:layers=N` cuts are saved to `work` in fp16."""
    folder = None if parse_spec(model).layers else model_folder(model)
    if folder is not None:
        checkpoint = find_checkpoint(folder)
        readable = safetensors_copy(checkpoint, work / "source") if checkpoint.pickled else folder
        return readable, load_tokenizer(folder)
    net, tokenizer = load_model(model, dtype=torch.float16, device="cpu")
    ensure_free_space(work.parent, fp16_bytes(net.config))
    folder = work / "source"
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def safetensors_copy(checkpoint: Checkpoint, dst: Path) -> Path:
    """The same tensors, names and dtypes as safetensors, one shard at a time, with the folder's other files.
    gptqmodel reads safetensors only (for pickles it falls back to a whole-model load and re-save in /tmp)."""
    ensure_free_space(dst.parent, sum(path.stat().st_size for path in checkpoint.files))
    dst.mkdir()
    index = weight_index(checkpoint)  # every pickle passes the safe loader before anything is written
    names = {path: path.name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"
             for path in checkpoint.files}
    for path, name in names.items():
        save_file(read_pickle(path), dst / name, metadata={"format": "pt"})
    if len(names) > 1:
        weight_map = {key: names[path] for key, path in sorted(index.items())}
        (dst / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for path in checkpoint.folder.iterdir():
        if path.is_file() and path.suffix != ".bin" and path.name != PICKLE_INDEX:
            shutil.copy2(path, dst / path.name)
    return dst


def fp16_bytes(config: GPTNeoXConfig) -> int:
    """Size of the model in fp16, from its config alone."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPTNeoXForCausalLM(config).parameters())
    return 2 * params


def quantized_linear_params(config: GPTNeoXConfig) -> int:
    h, layers = config.hidden_size, config.num_hidden_layers
    return layers * (4 * h * h + 2 * h * config.intermediate_size)


def pack_impl(config: GPTNeoXConfig, device: str) -> str:
    """gptqmodel's packer: "auto" picks the GPU packer on CUDA and a g++-built block packer on CPU (~3x faster
    than numpy at 3B, built once into the cache); the numpy one never compiles. Output is the same bytes."""
    if device.startswith("cuda") or quantized_linear_params(config) >= BLOCK_PACK_MIN_PARAMS:
        return "auto"
    return "original"


def compute_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA. fp32 on CPU, where fp16 matmuls are emulated: the calibration passes run about 2x faster
    (the GPTQ solve is fp32 either way), and the unquantized tensors are stored as fp16 all the same."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def quantize_config(options: GptqOptions, config: GPTNeoXConfig, device: str, offload: Path):
    _, QuantizeConfig = gptqmodel_api()
    kwargs = dict(
        bits=options.bits,
        group_size=options.group_size,
        desc_act=options.desc_act,
        sym=options.sym,
        format="gptq",  # classic v1 zero points, what auto-gptq, vLLM and TGI read
        device=device,
        pack_impl=pack_impl(config, device),
        offload_to_disk_path=str(offload),
    )
    if options.method == "rtn":
        kwargs["weight_only"] = {"method": "rtn"}
    else:
        # gptqmodel's group-aware reordering needs groups and cannot be combined with act-order.
        kwargs.update(true_sequential=options.true_sequential, damp_percent=options.damp,
                      act_group_aware=not options.desc_act and options.group_size != -1)
    return QuantizeConfig(**kwargs)


def quantize(folder: Path, config: GPTNeoXConfig, samples: list[dict], options: GptqOptions, device: str,
             work: Path, timings: dict[str, float]) -> Path:
    """Run gptqmodel on `folder`; returns the folder it saved to."""
    with timed(timings, "import_gptqmodel"):
        GPTQModel, _ = gptqmodel_api()
    qconfig = quantize_config(options, config, device, work / "offload")
    with timed(timings, "gptqmodel_load"):
        # No device=: it clashes with QuantizeConfig.device. An explicit dtype, else gptqmodel picks bf16 on CPU.
        model = GPTQModel.load(str(folder), qconfig, dtype=compute_dtype(device),
                               attn_implementation=ATTN_IMPLEMENTATION)
    with timed(timings, "gptqmodel_quantize"):
        model.quantize(samples or None, batch_size=QUANTIZE_BATCH)
    saved = work / "gptqmodel"
    with timed(timings, "gptqmodel_save"):
        model.save(str(saved))
    del model
    gc.collect()
    shutil.rmtree(work / "offload", ignore_errors=True)
    return saved


def write_tensors(saved: Path, dst: Path) -> None:
    """gptqmodel's tensors under the source checkpoint's names, floats as fp16, as model.safetensors (sharded past
    4 GB)."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(saved.glob("*.safetensors")):
        state.update(load_file(file))
    # GPT-NeoX checkpoints name the head embed_out, and vLLM/TGI look it up by that name; gptqmodel saves the
    # transformers-5 runtime name.
    state["embed_out.weight"] = state.pop("lm_head.weight")
    state = {name: t.half() if t.is_floating_point() else t for name, t in state.items()}
    save_torch_state_dict(state, dst, max_shard_size=MAX_SHARD_SIZE)


def classic_quantization_config(saved: Path) -> dict:
    """gptqmodel's quantize_config.json made reproducible, with auto-gptq's top-level keys."""
    qconfig = json.loads((saved / "quantize_config.json").read_text())
    meta = qconfig.get("meta", {})
    meta.pop("offload_to_disk_path", None)  # a temporary path: would make every export differ
    for key in ("damp_percent", "true_sequential", "static_groups"):  # gptqmodel keeps these under meta only
        # RTN has no damp: a top-level null would fail transformers' GPTQConfig check
        if meta.get(key) is not None:
            qconfig.setdefault(key, meta[key])
    return qconfig


def write_model_files(saved: Path, source: str, config: GPTNeoXConfig, tokenizer: PreTrainedTokenizerBase,
                      dst: Path) -> dict:
    """Everything a loader needs: tensors, config.json, quantize_config.json, tokenizer and generation config."""
    write_tensors(saved, dst)
    qconfig = classic_quantization_config(saved)
    config.dtype = torch.float16
    config._name_or_path = source  # not the folder it was read from, which may be a temporary one
    write_config(config, dst, extra={"quantization_config": qconfig})
    (dst / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(tokenizer, dst)  # gptqmodel's save rewrites tokenizer_config.json: use the source's
    write_generation_config(tokenizer, dst)
    return qconfig


def quality_dataset(model: str) -> Dataset:
    """A held-out text slice: the tiny model's held-out text for the tiny presets, else WikiText-2 test
    (the tiny held-out text where the shared data is absent)."""
    tiny = parse_spec(model).preset in TINY_PRESETS
    name = "wikitext2-test" if not tiny and data_dir(required=False) else "tiny-heldout"
    return Dataset(f"{name}[:{QUALITY_CHARS} chars]", text=load_dataset(name).text[:QUALITY_CHARS])


def measure_quality(model: str, source: Path, artifact: Path, device: str) -> dict:
    """Perplexity of the source and the artifact on a held-out slice, and their top-1 agreement and KL."""
    dataset = quality_dataset(model)
    reference = open_backend(str(source), device=device)
    method = method_for(reference, None, None, batch_size=4)
    rows: list[torch.Tensor] = []
    source_ppl = perplexity(reference, dataset, method, on_batch=lambda logprobs, _: rows.append(logprobs))
    reference_name = reference.name
    del reference
    gc.collect()
    quantized = open_gptq(artifact, device)
    agreement, batches = Agreement(), iter(rows)
    quant_ppl = perplexity(quantized, dataset, method,
                           on_batch=lambda logprobs, targets: agreement.add(next(batches), logprobs, targets))
    figures = agreement.summary()
    return {
        "data": dataset.name,
        "window": method.window,
        "stride": method.stride,
        "tokens": source_ppl.tokens,
        "source": {"backend": reference_name, "perplexity": source_ppl.as_dict()["token_perplexity"]},
        "quantized": {"backend": quantized.name, "perplexity": quant_ppl.as_dict()["token_perplexity"]},
        "top1_agreement": figures["top1_agreement"],
        "kl_mean": figures["kl_mean"],
    }


def calibration_summary(specs: tuple[str, ...], samples: list[dict], seqlen: int, seed: int) -> dict:
    return {"datasets": list(specs), "samples": len(samples), "tokens": sum(len(s["input_ids"]) for s in samples),
            "seqlen": seqlen, "seed": seed}


def model_card(model: str, options: GptqOptions, calibration: dict | None, quality: dict) -> str:
    """README.md: what the artifact is, how it was made, what it measured, how to use it, its license."""
    method = "GPTQ" if options.method == "gptq" else "round-to-nearest (RTN)"
    group = "per column" if options.group_size == -1 else f"group size {options.group_size}"
    calib_line = (
        f"{calibration['samples']} samples, {calibration['tokens']} tokens (up to {calibration['seqlen']} each) "
        f"from {', '.join(f'`{d}`' for d in calibration['datasets'])}, drawn with seed {calibration['seed']} "
        "(text cut into windows, dialogues rendered in the StableLM-Tuned-Alpha prompt format)"
        if options.method == "gptq" else "none (round-to-nearest needs no data)"
    )
    src, quant = quality["source"], quality["quantized"]
    return f"""---
license: {LICENSE}
base_model: {model}
tags: [gptq, {options.bits}bit, gpt-neox, stablelm, quantkit]
---
# {model} — {method} {options.bits}-bit

`{model}` quantized to {options.bits} bits ({group}, {'act-order' if options.desc_act else 'no act-order'}, \
{'symmetric' if options.sym else 'asymmetric'}) with {method} by quantkit (gptqmodel {versions().get('gptqmodel', '?')}).

## Format
Classic GPTQ checkpoint (`checkpoint_format: gptq`, v1 zero points, int32-packed): every quantized linear has
`qweight`, `qzeros`, `scales`, `g_idx` and its fp16 `bias`; all other tensors keep the source checkpoint's names
(the head is `embed_out.weight`) in fp16. It loads with transformers (+ optimum, gptqmodel), vLLM and TGI.

## Settings
| option | value |
|---|---|
| method | {options.method} |
| bits | {options.bits} |
| group_size | {options.group_size} |
| desc_act | {options.desc_act} |
| sym | {options.sym} |
| true_sequential | {options.true_sequential} |
| damp | {options.damp} |

Calibration: {calib_line}.

## Measured at export
Token perplexity on `{quality['data']}` ({quality['tokens']} tokens, window {quality['window']}, \
stride {quality['stride']}):

| model | backend | perplexity |
|---|---|---|
| source | {src['backend']} | {src['perplexity']:.3f} |
| this artifact | {quant['backend']} | {quant['perplexity']:.3f} |

Top-1 agreement with the source {quality['top1_agreement']:.1%}, mean KL divergence {quality['kl_mean']:.4f} nats.

## Use
```bash
quantkit generate --model path/to/this/folder --prompt "What is GPTQ?"
```

## License
CC BY-NC-SA 4.0, inherited from the source model (StableLM-Tuned-Alpha is released under CC BY-NC-SA 4.0).
"""


def export_gptq(model: str, out: Path, options: GptqOptions, *, overwrite: bool = False,
                manifest_extra: dict | None = None) -> Path:
    """Quantize `model` and write the artifact folder `out`; returns `out`."""
    out = Path(out)
    device = options.device or default_device()
    calib = default_calib(model, options.calib) if options.method == "gptq" else ()
    sources: list[CalibSource] = (
        load_calibration(calib, options.calib_samples, options.allow_eval_split) if calib else []
    )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with staged_output(out, overwrite) as staging:
            work = staging / WORK
            work.mkdir()
            with timed(timings, "source"):
                folder, tokenizer = source_folder(model, work)
            config = AutoConfig.from_pretrained(folder)
            ensure_free_space(staging, fp16_bytes(config))
            seqlen = min(options.calib_seqlen, config.max_position_embeddings)
            with timed(timings, "calibration"):
                samples = calibration_samples(tokenizer, sources, seqlen, options.seed)
            saved = quantize(folder, config, samples, options, device, work, timings)
            with timed(timings, "write"):
                qconfig = write_model_files(saved, model, config, tokenizer, staging)
            shutil.rmtree(saved)
            with timed(timings, "measure"):
                quality = measure_quality(model, folder, staging, device)
            shutil.rmtree(work, ignore_errors=True)
            calibration = calibration_summary(calib, samples, seqlen, options.seed) if samples else None
            (staging / "README.md").write_text(model_card(model, options, calibration, quality))
            timings["total"] = round(time.perf_counter() - start, 2)
            write_manifest(staging, {
                "format": "gptq",
                "source": source_record(model),
                "options": asdict(options),
                "versions": versions(),
                "quantization_config": qconfig,
                "calibration": calibration,
                "validation": {"loads_with": quality["quantized"]["backend"],
                               "top1_agreement": quality["top1_agreement"], "kl_mean": quality["kl_mean"]},
                "metrics": {"perplexity": quality, "timings_s": timings},
                **(manifest_extra or {}),
            })
    except OSError as exc:  # a full disk or unwritable folder mid-way: staged_output has already cleaned up
        raise QuantkitError(f"export to {out} failed: {exc}") from None
    return out
