"""The artifact formats, one registry: each format's exporter, its options, the files its folder holds and the
software that serves it. The CLI (`quantkit export --fmt`), the pipeline (recipes), `quantkit verify` and the
downstream suite all read this table; adding a format means adding one entry here.

Options arrive as one mapping of option names (the CLI's parsed arguments or a recipe's [export] table); each
exporter takes the fields of its options dataclasses from it, a missing or None value keeping the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from quantkit.errors import QuantkitError

Options = Mapping[str, Any]
CHAT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def options_from(cls: type, values: Options):
    """An options dataclass from the mapping's entries of its field names (lists become tuples)."""
    picked = {f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in picked.items()})


def export_gptq(model: str, out: Path, values: Options, overwrite: bool, manifest_extra: dict | None) -> None:
    from quantkit.export.gptq import GptqOptions, export_gptq

    export_gptq(model, out, options_from(GptqOptions, values), overwrite=overwrite, manifest_extra=manifest_extra)


def export_onnx(model: str, out: Path, values: Options, overwrite: bool, manifest_extra: dict | None) -> None:
    from quantkit.export.onnx import OnnxOptions, export_onnx

    export_onnx(model, out, options_from(OnnxOptions, values), overwrite=overwrite, manifest_extra=manifest_extra)


def export_onnx_int4(model: str, out: Path, values: Options, overwrite: bool, manifest_extra: dict | None) -> None:
    from quantkit.export.gptq import GptqOptions
    from quantkit.export.onnx_int4 import Int4Options, export_onnx_int4

    export_onnx_int4(model, out, options_from(Int4Options, values), overwrite=overwrite,
                     gptq_options=options_from(GptqOptions, values), manifest_extra=manifest_extra)


def gptq_contract(folder: Path) -> list[str]:
    from quantkit.downstream import check_gptq

    return check_gptq(folder)


def onnx_contract(folder: Path) -> list[str]:
    from quantkit.downstream import check_onnx

    return check_onnx(folder)


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    export: Callable[[str, Path, Options, bool, dict | None], None]
    files: tuple[str, ...]  # files every folder of this format holds (weights: see its contract)
    contract: Callable[[Path], list[str]]  # what its downstream loaders expect, checked field by field
    consumers: tuple[str, ...]  # the software that loads it, proven by the downstream suite


FORMATS = {
    "gptq": Format(
        "gptq", "GPTQ 4-bit checkpoint, classic layout", export_gptq,
        ("config.json", "quantize_config.json", *CHAT_FILES), gptq_contract,
        ("vllm", "transformers", "tgi"),
    ),
    "onnx": Format(
        "onnx", "fp16/fp32 ONNX with KV cache", export_onnx,
        ("model.onnx", "config.json", "genai_config.json", *CHAT_FILES), onnx_contract,
        ("onnxruntime", "optimum", "onnxruntime-genai"),
    ),
    "onnx-int4": Format(
        "onnx-int4", "GPTQ weights in ONNX (MatMulNBits)", export_onnx_int4,
        ("model.onnx", "config.json", "genai_config.json", *CHAT_FILES), onnx_contract,
        ("onnxruntime", "optimum", "onnxruntime-genai"),
    ),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise QuantkitError(f"unknown format '{name}' (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def serving_problems(folder: Path, name: str) -> list[str]:
    """What a downstream loader would trip on in `folder` of format `name`: missing files, then its contract (none
    for a format outside the registry)."""
    if name not in FORMATS:
        return []
    fmt = FORMATS[name]
    from quantkit.downstream import check_chat_files

    missing = [f"{file}: missing" for file in fmt.files if not (folder / file).is_file()]
    return missing + fmt.contract(folder) + check_chat_files(folder)
