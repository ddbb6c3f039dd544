"""Recipes: one TOML file per (model, format), validated against a schema declared as data.

    name = "tiny-gptq-4bit"
    [source]   model (hub id, local folder or preset), revision (a hub commit or tag), dtype of the reference
    [export]   format (gptq | onnx | onnx-int4) and that format's options
    [eval]     data spec, window, stride, kld_tokens
    [bench]    prompt_lengths, batches, decode_tokens, repeats

An unknown key, a wrong type or an out-of-range value is a one-line error naming the key and the file.
`--set SECTION.KEY=VALUE` overrides (a TOML value; bare words are strings) pass through the same checks.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS


@dataclass(frozen=True)
class Field:
    """One recipe key: its type, default and the values it may take."""

    kind: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], bool] = lambda value: True
    expect: str = ""


def one_of(*values: Any) -> Field:
    return Field(type(values[0]), values[0], lambda v: v in values, f"one of {', '.join(map(str, values))}")


def positive(default: int) -> Field:
    return Field(int, default, lambda v: v > 0, ">= 1")


def positive_list(default: list[int]) -> Field:
    return Field(list, default, lambda v: bool(v) and all(isinstance(x, int) and x > 0 for x in v), "a list of ints >= 1")


def strings(default: list[str]) -> Field:
    return Field(list, default, lambda v: bool(v) and all(isinstance(x, str) for x in v), "a non-empty list of strings")


SCHEMA: dict[str, dict[str, Field]] = {
    "source": {
        "model": Field(str, None, bool, "a hub id, folder or preset"),
        "revision": Field(str, "", lambda v: v == v.strip() and "@" not in v, "a commit sha or tag, '' = default branch"),
        "dtype": Field(str, "auto", lambda v: v in ("auto", "fp32", "fp16", "bf16"), "auto, fp32, fp16 or bf16"),
    },
    "export": {
        "format": one_of(*FORMATS),
        # GPTQ (and the GPTQ step of onnx-int4)
        "method": one_of("gptq", "rtn"),
        "bits": Field(int, 4, lambda v: v in (2, 3, 4, 8), "2, 3, 4 or 8"),
        "group_size": Field(int, 128, lambda v: v == -1 or (v >= 16 and v & (v - 1) == 0), "-1 or a power of two >= 16"),
        "desc_act": Field(bool, False),
        "sym": Field(bool, True),
        "true_sequential": Field(bool, True),
        "damp": Field(float, 0.01, lambda v: 0 < v < 1, "in (0, 1)"),
        "calib": strings(["wikitext2-valid"]),
        "calib_samples": positive(128),
        "calib_seqlen": positive(512),
        "seed": Field(int, 0, lambda v: v >= 0, ">= 0"),
        # ONNX
        "dtype": one_of("fp16", "fp32"),
        "opset": Field(int, 18, lambda v: 17 <= v <= 23, "17..23"),
        "validate": Field(bool, True),
        "accuracy_level": Field(int, 0, lambda v: 0 <= v <= 4, "0..4 (onnx-int4: MatMulNBits compute type)"),
    },
    "eval": {
        "data": Field(str, "wikitext2-test", bool, "a dataset spec"),
        "window": Field(int, 0, lambda v: v >= 0, ">= 0 (0 = model default)"),
        "stride": Field(int, 0, lambda v: v >= 0, ">= 0 (0 = window / 4)"),
        "batch_size": positive(4),
        "kld_tokens": positive(16384),
    },
    "bench": {
        "prompt_lengths": positive_list([128, 512, 2048]),
        "batches": positive_list([1, 8]),
        "decode_tokens": positive(64),
        "repeats": positive(3),
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    source: dict
    export: dict
    eval: dict
    bench: dict

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "export": self.export, "eval": self.eval, "bench": self.bench}


def check_value(path: Path, key: str, value: Any, spec: Field) -> None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if spec.kind is float:
        kinds = (float, int)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise QuantkitError(f"{path}: '{key}' must be {names}, got {type(value).__name__} {value!r}")
    if not spec.check(value):
        raise QuantkitError(f"{path}: '{key}' = {value!r} is out of range (expected {spec.expect})")


def parse_value(raw: str) -> Any:
    """A TOML value (4, true, [1, 8], "x"); anything that does not parse as one is taken as a string."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """The recipe's tables with each SECTION.KEY=VALUE override set (checked later, like the file's own keys)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for override in overrides:
        key, sep, raw = override.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not section or not field:
            raise QuantkitError(f"--set {override!r}: expected SECTION.KEY=VALUE, e.g. eval.data=wikitext2-valid")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise QuantkitError(f"--set {override!r}: '{section}' is not a table")
        table[field] = parse_value(raw.strip())
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Parse and validate a recipe file with `overrides` applied, filling defaults."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise QuantkitError(f"{path}: not valid TOML: {exc}") from None
    data = apply_overrides(data, overrides)
    unknown = sorted(set(data) - {"name", *SCHEMA})
    if unknown:
        raise QuantkitError(f"{path}: unknown key '{unknown[0]}' (known: name, {', '.join(SCHEMA)})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise QuantkitError(f"{path}: 'name' must be a non-empty string")
    sections = {}
    for section, fields in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise QuantkitError(f"{path}: '{section}' must be a table")
        for key in given:
            if key not in fields:
                raise QuantkitError(f"{path}: unknown key '{section}.{key}' (known: {', '.join(fields)})")
        values = {}
        for key, spec in fields.items():
            if key not in given and spec.default is None:
                raise QuantkitError(f"{path}: missing required key '{section}.{key}'")
            value = given.get(key, spec.default)
            check_value(path, f"{section}.{key}", value, spec)
            values[key] = float(value) if spec.kind is float else value
        sections[section] = values
    check_revision(path, sections["source"])
    return Recipe(name=name, path=path, **sections)


def check_revision(path: Path, source: dict) -> None:
    """`source.revision` pins a hub id only."""
    from quantkit.sources import with_revision

    try:
        with_revision(source["model"], source["revision"])
    except QuantkitError as exc:
        raise QuantkitError(f"{path}: 'source.revision': {exc}") from None
