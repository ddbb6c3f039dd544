"""Model sources: a built-in preset, a local Hugging Face folder or a hub id -> (GPTNeoXForCausalLM, tokenizer).

Presets:
  tiny, tiny-stablelm   the trained tiny StableLM (own tokenizer / the real StableLM tokenizer), see tiny.py
  stablelm-3b, -7b      the exact StableLM-Alpha shapes with seeded random weights (shape, memory, speed work)
  stablelm-200m         a ~200M-parameter StableLM-shaped model with random weights
A preset takes `:layers=N` to cut its depth, e.g. `stablelm-3b:layers=2`; a hub id takes `@REVISION` (a commit,
tag or branch), e.g. `stabilityai/stablelm-tuned-alpha-3b@<sha>`, and is downloaded as one snapshot.
Weights load from safetensors, or, where a folder has none, from PyTorch pickles (`pytorch_model*.bin`) through
torch's restricted unpickler, which rebuilds tensors only; remote code is never trusted.
"""
from __future__ import annotations

import functools
import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from quantkit.attention import ATTN_IMPLEMENTATION
from quantkit.errors import QuantkitError
from quantkit.fingerprint import fingerprint, sha256_file
from quantkit.paths import data_dir
from quantkit.shapes import STABLELM_TOKENIZER, RandomShape
from quantkit.tiny import tiny_folder

SUPPORTED_MODEL_TYPE = "gpt_neox"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # in order of preference
HUB_FILES = ("*.json", "*.txt")  # config, tokenizer and index files of a hub snapshot


RANDOM_PRESETS = {
    "stablelm-3b": RandomShape(hidden=4096, layers=16, heads=32, vocab_rows=50688),
    "stablelm-7b": RandomShape(hidden=6144, layers=16, heads=48, vocab_rows=50432),
    "stablelm-200m": RandomShape(hidden=1024, layers=8, heads=16, vocab_rows=50688),
}
TINY_PRESETS = {"tiny": "own", "tiny-stablelm": "stablelm"}
PRESETS = (*TINY_PRESETS, *RANDOM_PRESETS)


@dataclass(frozen=True)
class Spec:
    """A parsed `--model` value."""

    preset: str | None
    layers: int | None
    folder: Path | None
    hub_id: str | None
    revision: str | None = None


def parse_spec(spec: str) -> Spec:
    """Tell a preset (with optional `:layers=N`), an existing folder and a hub id (with optional `@REVISION`)
    apart."""
    name, _, options = spec.partition(":")
    if name in PRESETS:
        layers = None
        if options:
            match = re.fullmatch(r"layers=(\d+)", options)
            if not match or int(match.group(1)) < 1:
                raise QuantkitError(f"bad preset option '{options}' in '{spec}' (expected layers=N, N >= 1)")
            layers = int(match.group(1))
        return Spec(name, layers, None, None)
    path = Path(spec).expanduser()
    hub_id, _, revision = spec.partition("@")
    if path.exists() or spec.startswith((".", "/", "~")) or hub_id.count("/") != 1:
        return Spec(None, None, path, None)
    if "@" in spec and not revision:
        raise QuantkitError(f"'{spec}': nothing after '@' (expected HUB_ID@REVISION)")
    return Spec(None, None, None, hub_id, revision or None)


def with_revision(spec: str, revision: str | None) -> str:
    """`spec` pinned to a hub commit, tag or branch (`--revision`, `source.revision`): `HUB_ID@REVISION`."""
    if not revision:
        return spec
    parsed = parse_spec(spec)
    if parsed.hub_id is None:
        raise QuantkitError(f"a revision pins a hub id, and '{spec}' is a local folder or preset")
    if parsed.revision is not None:
        raise QuantkitError(f"'{spec}' already names a revision; drop '@{parsed.revision}' or the other one")
    return f"{spec}@{revision}"


def model_folder(spec: str) -> Path | None:
    """The Hugging Face folder behind a spec (the tiny presets' cache folder and hub snapshots included); None for
    random presets."""
    parsed = parse_spec(spec)
    if parsed.preset in TINY_PRESETS:
        return tiny_folder(TINY_PRESETS[parsed.preset]) / "model"
    if parsed.hub_id is not None:
        folder, _ = hub_snapshot(parsed.hub_id, parsed.revision)
        check_folder(folder)
        return folder
    if parsed.folder is not None:
        check_folder(parsed.folder)
        return parsed.folder
    return None


@functools.cache
def hub_snapshot(hub_id: str, revision: str | None) -> tuple[Path, str]:
    """(local folder, commit sha) of one hub commit: its config, tokenizer and weights, safetensors when the repo
    has them, else its PyTorch pickles. The commit is resolved first, so every file comes from the same one."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(hub_id, revision=revision)
        names = [sibling.rfilename for sibling in info.siblings or ()]
        weights = next((p for p in WEIGHT_PATTERNS if any(Path(n).match(p) for n in names)), WEIGHT_PATTERNS[0])
        folder = snapshot_download(hub_id, revision=info.sha, allow_patterns=[*HUB_FILES, weights])
    except Exception as exc:  # offline, unknown repo or revision, gated: the user needs one line
        at = f" at revision '{revision}'" if revision else ""
        raise QuantkitError(f"could not fetch '{hub_id}'{at} from the Hugging Face hub: {first_line(exc)}") from None
    return Path(folder), info.sha


def load_model_config(spec: str) -> GPTNeoXConfig:
    """The config of a spec, with `:layers=N` applied; no weights are read (a hub id is downloaded first)."""
    parsed = parse_spec(spec)
    if parsed.preset in RANDOM_PRESETS:
        return RANDOM_PRESETS[parsed.preset].config(parsed.layers)
    config = GPTNeoXConfig.from_pretrained(model_folder(spec))
    if parsed.layers:
        config.num_hidden_layers = min(parsed.layers, config.num_hidden_layers)
    return config


def check_folder(folder: Path) -> dict:
    """Validate a local checkpoint folder and return its config; one clear error per problem."""
    if not folder.is_dir():
        raise QuantkitError(f"model folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise QuantkitError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type != SUPPORTED_MODEL_TYPE:
        raise QuantkitError(
            f"unsupported architecture '{model_type}' in {config_file}: quantkit supports GPT-NeoX (StableLM-Alpha)"
        )
    find_checkpoint(folder)
    return config


@dataclass(frozen=True)
class Checkpoint:
    """A folder's weight files: its safetensors when it has any, else its PyTorch pickles."""

    folder: Path
    files: tuple[Path, ...]

    @property
    def pickled(self) -> bool:
        return self.files[0].suffix == ".bin"


def find_checkpoint(folder: Path) -> Checkpoint:
    for pattern in WEIGHT_PATTERNS:
        files = tuple(sorted(folder.glob(pattern)))
        if files:
            return Checkpoint(folder, files)
    raise QuantkitError(f"{folder} has no weights (expected *.safetensors, or pytorch_model*.bin)")


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """One PyTorch pickle through `torch.load(weights_only=True)`, memory-mapped when it is a zip archive, as
    transformers loads it. Written out here because transformers' refusal of a pickle that asks for more than
    tensors is a multi-line message that does not name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise QuantkitError(
            f"refused {path}: its pickle asks for more than tensors ({refusal(exc)}); nothing in it was run"
        ) from None
    except Exception as exc:  # truncated or not a torch file
        raise QuantkitError(f"could not read weights from {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise QuantkitError(f"refused {path}: not a state dict of tensors")
    return state


def refusal(exc: pickle.UnpicklingError) -> str:
    """The restricted unpickler's reason (e.g. `Unsupported global: GLOBAL posix.system`) out of torch's long
    message."""
    match = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global|$)", str(exc), re.MULTILINE)
    return match.group(1) if match else first_line(exc)


@functools.cache
def announce_pickles(folder: Path) -> None:
    """The one line (per folder and process) saying where the weights came from."""
    print(f"note: {folder} has PyTorch pickle weights and no safetensors: read by torch.load(weights_only=True), "
          "which rebuilds tensors only", file=sys.stderr)


def weight_index(checkpoint: Checkpoint) -> dict[str, Path]:
    """The file holding each tensor. Every pickle passes the safe loader here (mapped, not read), so a refused
    one fails before anything is loaded or written."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for path in checkpoint.files:
        if checkpoint.pickled:
            index.update(dict.fromkeys(read_pickle(path), path))
            continue
        try:
            with safe_open(path, "pt") as handle:
                index.update(dict.fromkeys(handle.keys(), path))
        except Exception as exc:  # truncated or corrupt header
            raise QuantkitError(f"could not load weights from {path}: {first_line(exc)}") from None
    if checkpoint.pickled:
        announce_pickles(checkpoint.folder)
    return index


def source_record(spec: str) -> dict:
    """The manifest's account of a source: the hub id and the commit it resolved to, or the local folder, and the
    sha256 of every weight file read (a random preset has none: its weights are seeded)."""
    parsed = parse_spec(spec)
    if parsed.preset in RANDOM_PRESETS:
        return {"model": spec, "preset": parsed.preset}
    record: dict = {"model": spec}
    folder = model_folder(spec)
    if parsed.hub_id is not None:
        record |= {"hub_id": parsed.hub_id, "revision": parsed.revision, "commit": hub_snapshot(parsed.hub_id,
                                                                                               parsed.revision)[1]}
    else:
        record["folder"] = str(folder.resolve())
    checkpoint = find_checkpoint(folder)
    record["weights_format"] = "pytorch-pickle" if checkpoint.pickled else "safetensors"
    record["weights_sha256"] = {path.name: sha256_file(path) for path in checkpoint.files}
    return record


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here; the user needs one line
        raise QuantkitError(f"could not load a tokenizer from {source}: {first_line(exc)}") from None


def random_preset_tokenizer() -> PreTrainedTokenizerBase:
    """The real StableLM tokenizer where shared data is present, else the tiny model's own."""
    shared = data_dir(required=False)
    if shared is not None and (shared / STABLELM_TOKENIZER).is_dir():
        return load_tokenizer(shared / STABLELM_TOKENIZER)
    return load_tokenizer(tiny_folder("own") / "model")


def build_random(shape: RandomShape, layers: int | None, dtype: torch.dtype, device: str) -> GPTNeoXForCausalLM:
    """Seeded random weights, created directly in `dtype` on `device` (a 7B never exists in fp32)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(
            shape.config(layers), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    return model.eval()


def load_pretrained(folder: Path, dtype: torch.dtype, device: str) -> GPTNeoXForCausalLM:
    """transformers' loader, on the folder's safetensors, or on its pickles once each has passed the safe loader
    (transformers reads them with the same `torch.load(weights_only=True, mmap=True)`)."""
    checkpoint = find_checkpoint(folder)
    if checkpoint.pickled:
        weight_index(checkpoint)
    try:
        model = GPTNeoXForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype,
            device_map=device,
            use_safetensors=not checkpoint.pickled,
            trust_remote_code=False,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
    except Exception as exc:  # corrupt or truncated weights, missing tensors
        raise QuantkitError(f"could not load weights from {folder}: {first_line(exc)}") from None
    return model.eval()


def load_model(
    spec: str, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[GPTNeoXForCausalLM, PreTrainedTokenizerBase]:
    """Model and tokenizer for a `--model` value; fp16 on CUDA, fp32 on CPU unless `dtype` says otherwise."""
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    parsed = parse_spec(spec)
    if parsed.preset in RANDOM_PRESETS:
        model = build_random(RANDOM_PRESETS[parsed.preset], parsed.layers, dtype, device)
        return model, random_preset_tokenizer()
    folder = model_folder(spec)
    model = load_pretrained(folder, dtype, device)
    if parsed.layers:
        cut_layers(model, parsed.layers)
    return model, load_tokenizer(folder)


def cut_layers(model: GPTNeoXForCausalLM, layers: int) -> None:
    """Keep the first `layers` transformer blocks (for quick runs at real width)."""
    model.gpt_neox.layers = model.gpt_neox.layers[:layers]
    model.config.num_hidden_layers = len(model.gpt_neox.layers)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def source_fingerprint(model: str) -> str:
    """A model's identity: file names, sizes and mtimes of a folder (the tiny presets' folder included), else the
    spec (random presets are seeded; a hub id names its revision)."""
    folder = model_folder(model) if parse_spec(model).preset in TINY_PRESETS else Path(model)
    if folder.is_dir():
        return fingerprint(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in folder.rglob("*") if p.is_file()))
    return fingerprint(model)
