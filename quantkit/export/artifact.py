"""What every artifact folder shares: atomic writing, config and tokenizer files, the manifest."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from quantkit.chat import CARD_MAX_NEW_TOKENS, CARD_TEMPERATURE, chat_template, stop_token_ids
from quantkit.errors import QuantkitError
from quantkit.fingerprint import sha256_file
from quantkit.paths import output_folder

MANIFEST = "quantkit.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` only if the block completes.

    On any exception (or a kill) nothing appears at `out`: the temporary folder is removed, or at worst left
    under a hidden `.name.tmp-*` name that a later run ignores.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output folder exists: {out} (pass --overwrite to replace it)")
    output_folder(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        publish_permissions(staging)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_permissions(folder: Path) -> None:
    """Give the artifact the umask's usual modes: mkdtemp makes the folder 0700 and some writers make 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def ensure_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before a large write, not half-way through it."""
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise QuantkitError(
            f"not enough disk space in {probe}: {needed_bytes / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free"
        )


def write_config(config: PretrainedConfig, dst: Path, extra: dict | None = None) -> None:
    """config.json with the original GPT-NeoX keys that older loaders (vLLM, TGI) read kept beside
    transformers 5's `rope_parameters`, plus `extra` keys (e.g. quantization_config)."""
    data = config.to_dict()
    rope = data.get("rope_parameters") or {}
    data.setdefault("rotary_pct", rope.get("partial_rotary_factor", 0.25))
    data.setdefault("rotary_emb_base", rope.get("rope_theta", 10000))
    data["architectures"] = ["GPTNeoXForCausalLM"]
    data.pop("_attn_implementation_autoset", None)
    data.pop("attn_implementation", None)
    data.update(extra or {})
    (dst / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """The source's tokenizer files byte for byte when they are on disk (else as transformers saves them), with
    the StableLM prompt format added to tokenizer_config.json as its `chat_template`, so `apply_chat_template`
    and chat servers (vLLM's /v1/chat/completions) render the card's prompt."""
    src = Path(tokenizer.name_or_path)
    if all((src / name).is_file() for name in TOKENIZER_FILES[:2]):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    else:
        tokenizer.save_pretrained(dst)
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = chat_template()
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.jinja").unlink(missing_ok=True)  # transformers 5 may save it apart; keep one copy


def write_generation_config(tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """The card's sampling defaults, with the StableLM stop ids as eos so servers stop where the card does."""
    stops = stop_token_ids(tokenizer)
    GenerationConfig(
        do_sample=True,
        temperature=CARD_TEMPERATURE,
        max_new_tokens=CARD_MAX_NEW_TOKENS,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    ).save_pretrained(dst)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, by relative path."""
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(folder: Path, info: dict) -> None:
    """quantkit.json: `info` (recipe, options, versions, validation, metrics) plus the sha256 of every file. The
    last step before publishing, so it first refuses a folder that misses what a downstream loader expects."""
    from quantkit.formats import serving_problems

    problems = serving_problems(folder, info["format"])
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QuantkitError(f"the {info['format']} artifact does not meet its loaders' expectations: {problems[0]}{more}")
    manifest = {**info, "files": file_hashes(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise QuantkitError(f"{folder} has no {MANIFEST}: not a quantkit artifact")
    return json.loads(path.read_text())


def source_lines(manifest: dict) -> list[str]:
    """What `quantkit verify` shows of an artifact's source: where it came from and each weight file's sha256."""
    source = manifest.get("source")
    if not isinstance(source, dict):  # artifacts made before sources were recorded name the spec only
        return [f"source: {source}"] if source else []
    if "preset" in source:
        return [f"source: preset {source['model']} (seeded random weights)"]
    if "hub_id" in source:
        pinned = f" (revision {source['revision']})" if source["revision"] else " (default branch)"
        lines = [f"source: hub {source['hub_id']} at commit {source['commit']}{pinned}"]
    else:
        lines = [f"source: folder {source['folder']}"]
    lines += [f"source weights ({source['weights_format']}): {name} sha256 {digest}"
              for name, digest in source["weights_sha256"].items()]
    return lines


def verify(folder: Path) -> list[str]:
    """Problems found by re-hashing an artifact against its manifest (empty when it verifies)."""
    expected = read_manifest(folder)["files"]
    actual = file_hashes(Path(folder))
    problems = [f"missing: {name}" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {name}" for name in sorted(actual.keys() - expected.keys())]
    problems += [f"sha256 mismatch: {name}" for name in sorted(expected.keys() & actual.keys()) if expected[name] != actual[name]]
    return problems


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on, for its manifest."""
    from importlib import metadata

    found = {}
    for package in ("quantkit", "torch", "transformers", "gptqmodel", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found
