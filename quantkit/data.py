"""Text and dialogue datasets for calibration and evaluation, named by a spec.

Specs:
  wikitext2-test, wikitext2-valid   WikiText-2 raw from the shared data folder (or the hub where there is internet)
  hh-helpful-test, hh-harmless-test Anthropic HH test dialogues (`chosen`), shared data folder
  alpaca-sample                     the 25-record Alpaca sample, shared data folder
  tiny-train, tiny-heldout          the tiny model's own training / held-out text (quantkit.corpus)
  PATH                              .txt/.raw (plain text) or .json/.jsonl/.jsonl.gz records: HH `chosen`,
                                    Alpaca instruction/input/output, Dolly instruction/context/response,
                                    ShareGPT `conversations`, or prompt/completion
  hub:NAME[:SPLIT]                  a hub dataset of one of those record shapes (needs internet)
  SPEC[:N]                          the first N characters of a text, or the first N dialogues (quick runs on
                                    large models, e.g. wikitext2-test[:20000])
Plain text is one string; dialogues are lists of (role, text) turns with role "user" or "assistant".
"""
from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from quantkit.errors import QuantkitError
from quantkit.paths import data_dir

Turn = tuple[str, str]
Dialogue = list[Turn]

SHARED_TEXT = {"wikitext2-test": "wikitext-2-raw/wiki.test.raw", "wikitext2-valid": "wikitext-2-raw/wiki.valid.raw"}
SHARED_RECORDS = {
    "hh-helpful-test": "instruct/hh-rlhf/helpful-base-test.jsonl.gz",
    "hh-harmless-test": "instruct/hh-rlhf/harmless-base-test.jsonl.gz",
    "alpaca-sample": "instruct/alpaca/alpaca_short.json",
}
TINY_TEXT = {"tiny-train": 0, "tiny-heldout": 1}  # index into quantkit.corpus.load_corpus()
KNOWN_SPECS = (*SHARED_TEXT, *SHARED_RECORDS, *TINY_TEXT)
TEXT_SUFFIXES = (".txt", ".raw")
RECORD_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz")
HEAD = re.compile(r"^(?P<spec>.+)\[:(?P<count>\d+)\]$")
EVALUATION_SPLIT = re.compile(r"(^|[^a-z])(test|eval)([^a-z]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Dataset:
    """A loaded spec: plain text or dialogues (exactly one is set)."""

    name: str
    text: str | None = None
    dialogues: list[Dialogue] | None = None


def is_evaluation_split(spec: str) -> bool:
    """True for specs and file names that look like a test/evaluation split (never calibrate on those)."""
    return bool(EVALUATION_SPLIT.search(Path(spec).name))


@functools.lru_cache(maxsize=8)
def load_dataset(spec: str) -> Dataset:
    """Load a spec (see module docstring); unknown specs and empty data are one-line errors. Cached: treat the
    result as read-only."""
    if head := HEAD.match(spec):
        whole, count = load_dataset(head["spec"]), int(head["count"])
        if count == 0:
            raise QuantkitError(f"dataset '{spec}': the head must be at least 1")
        if whole.text is not None:
            return Dataset(spec, text=whole.text[:count])
        return Dataset(spec, dialogues=whole.dialogues[:count])
    if spec in SHARED_TEXT:
        return Dataset(spec, text=read_text(data_dir() / SHARED_TEXT[spec]))
    if spec in SHARED_RECORDS:
        return Dataset(spec, dialogues=records_to_dialogues(read_records(data_dir() / SHARED_RECORDS[spec]), spec))
    if spec in TINY_TEXT:
        from quantkit.corpus import load_corpus

        return Dataset(spec, text=load_corpus()[TINY_TEXT[spec]])
    if spec.startswith("hub:"):
        return Dataset(spec, dialogues=records_to_dialogues(hub_records(spec[4:]), spec))
    path = Path(spec).expanduser()
    if path.name.endswith(TEXT_SUFFIXES) or path.name.endswith(RECORD_SUFFIXES):
        if path.name.endswith(TEXT_SUFFIXES):
            return Dataset(spec, text=read_text(path))
        return Dataset(spec, dialogues=records_to_dialogues(read_records(path), spec))
    raise QuantkitError(
        f"unknown dataset '{spec}': use one of {', '.join(KNOWN_SPECS)}, a .txt/.raw/.json/.jsonl(.gz) file, "
        "or hub:NAME[:SPLIT]"
    )


def check_file(path: Path) -> None:
    if path.is_dir():
        raise QuantkitError(f"dataset {path} is a folder, not a file")
    if not path.is_file():
        raise QuantkitError(f"dataset file not found: {path}")


def read_text(path: Path) -> str:
    """The decoded contents of a (gzipped) dataset file; a missing, empty or non-UTF-8 file is a one-line error."""
    check_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise QuantkitError(f"dataset {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise QuantkitError(f"dataset {path} is not a complete gzip file: {exc}") from None
    if not text.strip():
        raise QuantkitError(f"dataset is empty: {path}")
    return text


def read_records(path: Path) -> list[dict]:
    raw = read_text(path)
    try:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, list) else [data]


def hub_records(name: str) -> list[dict]:
    import datasets

    repo, _, split = name.partition(":")
    try:
        return list(datasets.load_dataset(repo, split=split or "train"))
    except Exception as exc:  # offline, missing dataset or split
        raise QuantkitError(f"could not load hub dataset '{name}': {str(exc).splitlines()[0]}") from None


def records_to_dialogues(records: Iterable[dict], spec: str) -> list[Dialogue]:
    dialogues = [dialogue for record in records if (dialogue := record_to_dialogue(record))]
    if not dialogues:
        raise QuantkitError(f"dataset '{spec}' has no dialogues in a known record shape")
    return dialogues


def record_to_dialogue(record: dict) -> Dialogue:
    """One record of a known instruction-tuning shape as (role, text) turns; [] for an unknown shape."""
    if "chosen" in record:  # Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..."
        return hh_turns(record["chosen"])
    if "instruction" in record and ("output" in record or "response" in record):  # Alpaca / Dolly
        context = record.get("input") or record.get("context") or ""
        user = f"{record['instruction']}\n\n{context}" if context else record["instruction"]
        return [("user", user), ("assistant", record.get("output", record.get("response", "")))]
    if "conversations" in record:  # ShareGPT
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        return [(roles[m["from"]], m["value"]) for m in record["conversations"] if m.get("from") in roles]
    if "prompt" in record and "completion" in record:
        return [("user", record["prompt"]), ("assistant", record["completion"])]
    return []


def hh_turns(transcript: str) -> Dialogue:
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[role], text.strip()) for role, text in zip(parts[1::2], parts[2::2])]
