"""A tiny, really trained StableLM-Tuned-Alpha look-alike, so every export path can be checked on a laptop CPU.

The model is a scaled-down StableLM-Alpha (GPT-NeoX: rotary_pct 0.25, rotary base 10000, parallel residual,
untied embeddings, LayerNorm eps 1e-5, GELU, 4x MLP) trained from a fixed seed on one CPU thread (one thread keeps
runs bit-reproducible) on the corpus of `quantkit.corpus`: Python reference sections, WikiText-2 *valid* articles,
HH-RLHF *helpful* dialogues and Django's documentation, every document a StableLM chat, every 10th document of each
source held out. Training draws fixed-length windows at seeded random offsets of the token stream of the training
text. Held-out perplexity is token-level, over non-overlapping windows of the training context length, on the saved
(fp16) weights, and uses every logit row (the padding rows included).

Two variants, one architecture at two sizes (see `VARIANTS`):
  "own"       an 8000-id byte-level BPE tokenizer trained on the training text, laid out like StableLM's:
              <|endoftext|>=0, <|padding|>=1, ..., <|SYSTEM|>, <|USER|>, <|ASSISTANT|> as the last three ids.
              Trained once (about 40 min on one core: `make tiny-model`) and committed in `quantkit/tiny_model/`.
  "stablelm"  the real StableLM-Tuned-Alpha tokenizer (50280 ids) from the shared data folder; its 50304-row
              embeddings do not fit the size allowed in git, so it is trained on first use (minutes) and cached.
Embedding and head rows are padded to a multiple of 128 beyond the tokenizer, as in the real checkpoints.

A model folder holds `model/` (a normal HF checkpoint, fp16 safetensors, with tokenizer files) and `metrics.json`
(held-out perplexity, train time, steps, sizes and the key). A cached folder is `<cache>/tiny-<variant>-<hash>/`,
the hash covering every setting, the model config, the corpus bytes, the tokenizer file and VERSION. The corpus
itself is rebuilt from its sources when needed (datasets `tiny-train`, `tiny-heldout`), never committed: it is
derived from the shared data.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from quantkit.chat import ASSISTANT_TOKEN, SYSTEM_TOKEN, USER_TOKEN, chat_template
from quantkit.corpus import load_corpus
from quantkit.errors import QuantkitError
from quantkit.paths import cache_dir, data_dir, file_lock
from quantkit.shapes import STABLELM_TOKENIZER, RandomShape

VERSION = 2  # bump when the training code changes in a way the settings do not show
ENDOFTEXT, PADDING = "<|endoftext|>", "<|padding|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
ROW_MULTIPLE = 128
COMMITTED = Path(__file__).resolve().parent / "tiny_model"  # the "own" model, as `make tiny-model` trains it
# Transformers 5 saves a fast tokenizer as "TokenizersBackend", a class 4.x does not know; both read this name.
PORTABLE_TOKENIZER_CLASS = "GPTNeoXTokenizer"


@dataclasses.dataclass(frozen=True)
class Settings:
    vocab: int  # tokenizer size of the "own" tokenizer (ignored for "stablelm")
    hidden: int
    layers: int
    heads: int
    context: int
    batch: int
    steps: int
    lr: float
    warmup: int
    seed: int = 0
    threads: int = 1  # one thread: bit-reproducible, and no slower when the CPU is shared
    weight_decay: float = 0.1  # AdamW's
    bf16: bool = False  # the forward under bf16 autocast (weights and optimizer stay fp32); faster on AVX512-BF16


VARIANTS = {
    # No weight decay: larger weights, so 4-bit RTN costs > 1 % as on real models; seed 3 of seeds 0-3 (README).
    "own": Settings(vocab=8000, hidden=256, layers=2, heads=4, context=256, batch=16, steps=3500, lr=3e-3, warmup=50,
                    seed=3, weight_decay=0.0, bf16=True),
    # The 50304-row head makes a token dearer even at half the width: trained on first use, so kept short.
    "stablelm": Settings(vocab=0, hidden=128, layers=2, heads=4, context=256, batch=8, steps=64, lr=1e-2, warmup=6),
}


def tiny_folder(tokenizer: str = "own") -> Path:
    """The tiny model folder for tokenizer "own" (committed) or "stablelm" (trained on first use, cached)."""
    if tokenizer not in VARIANTS:
        raise QuantkitError(f"unknown tiny-model tokenizer '{tokenizer}' (choose from {', '.join(VARIANTS)})")
    if tokenizer == "own":
        return committed_folder()
    return cached_folder(tokenizer, VARIANTS[tokenizer])


def committed_folder() -> Path:
    """The committed "own" model, refused when missing or trained with other settings than `VARIANTS["own"]`."""
    metrics = COMMITTED / "metrics.json"
    if not metrics.is_file():
        raise QuantkitError(f"the tiny model is missing at {COMMITTED}: run `make tiny-model` to train it")
    if json.loads(metrics.read_text())["key"]["settings"] != dataclasses.asdict(VARIANTS["own"]):
        raise QuantkitError(f"the tiny model at {COMMITTED} was trained with other settings: run `make tiny-model`")
    return COMMITTED


def cached_folder(variant: str, settings: Settings) -> Path:
    """`<cache>/tiny-<variant>-<hash>`, trained there on first use; concurrent first uses train once."""
    key = training_key(variant, settings)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / f"tiny-{variant}-{digest}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not folder.is_dir():
            with _staged(folder) as staging:
                _build(staging, variant, settings, key)
    return folder


def training_key(variant: str, settings: Settings) -> dict:
    """Everything a trained model depends on: any change here means another model."""
    source = _stablelm_tokenizer_file() if variant == "stablelm" else None
    architecture = _config(settings, settings.vocab).to_diff_dict()
    architecture.pop("transformers_version")
    train_text, heldout_text = load_corpus()
    return {
        "version": VERSION,
        "variant": variant,
        "settings": dataclasses.asdict(settings),
        "config": architecture,
        "corpus_sha256": hashlib.sha256((train_text + heldout_text).encode()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
    }


def _stablelm_tokenizer_file() -> Path:
    shared = data_dir(required=False)
    file = shared / STABLELM_TOKENIZER / "tokenizer.json" if shared else None
    if file is None or not file.is_file():
        raise QuantkitError(
            f"the 'stablelm' tiny model needs the StableLM tokenizer at <data>/{STABLELM_TOKENIZER}/tokenizer.json, "
            "which was not found (set QUANTKIT_DATA to the shared data folder, or use the 'own' tokenizer)"
        )
    return file


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """A temp folder beside `folder`, renamed into place only when the body succeeds, else removed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _build(out: Path, variant: str, settings: Settings, key: dict) -> None:
    """Train `variant` with `settings` and save it in `out`: `model/` (fp16 safetensors, tokenizer) + metrics.json."""
    train_text, heldout_text = load_corpus()
    if variant == "stablelm":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(_stablelm_tokenizer_file().parent)
    else:
        tokenizer = _train_tokenizer(train_text, settings.vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        model, losses = _train(tokenizer, settings, train_text)
        train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        model = model.to(torch.float16)  # what is saved; it is scored as saved
        perplexity, tokens = _heldout_perplexity(model.float(), tokenizer, heldout_text, settings.context)
    finally:
        torch.set_num_threads(threads)
    model.to(torch.float16).save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    _make_tokenizer_config_portable(out / "model" / "tokenizer_config.json")
    metrics = {
        "heldout_perplexity": perplexity,
        "heldout_tokens": tokens,
        "first_train_loss": sum(losses[:10]) / len(losses[:10]),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "steps": settings.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "vocab_rows": model.config.vocab_size,
        "key": key,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"tiny model ({variant}): held-out perplexity {perplexity:.1f} (vocab {len(tokenizer)}), "
        f"{settings.steps} steps in {train_seconds:.0f} s ({cpu_seconds:.0f} s CPU)",
        file=sys.stderr,
    )


def _make_tokenizer_config_portable(path: Path) -> None:
    """A tokenizer class transformers 4.x and 5.x both read, and the StableLM prompt as the chat template."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config["chat_template"] = chat_template()
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _train_tokenizer(train_text: str, vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE set up like the NeoX/StableLM tokenizer (NFC, byte-level, no prefix space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(CHAT_TOKENS),
        special_tokens=[ENDOFTEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Learn merges from the text between special tokens only, as the tokenizer will see it.
    special = "|".join(re.escape(token) for token in (ENDOFTEXT, *CHAT_TOKENS))
    tokenizer.train_from_iterator(re.split(special, train_text), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=PADDING,
        padding_side="left",  # as the StableLM-Tuned-Alpha tokenizer folder
    )


def _config(settings: Settings, tokenizer_size: int) -> GPTNeoXConfig:
    rows = math.ceil(tokenizer_size / ROW_MULTIPLE) * ROW_MULTIPLE
    config = RandomShape(hidden=settings.hidden, layers=settings.layers, heads=settings.heads, vocab_rows=rows).config()
    config.max_position_embeddings = settings.context  # what it was trained on
    # transformers 5 saves these as rope_parameters only; keep StableLM's own keys for older readers too.
    config.rotary_pct, config.rotary_emb_base = 0.25, 10000
    return config


def _train(
    tokenizer: PreTrainedTokenizerBase, settings: Settings, train_text: str
) -> tuple[GPTNeoXForCausalLM, list[float]]:
    """AdamW, linear warmup then cosine decay to 10%, on seeded random windows of the training tokens.

    Returns the model and the loss of every step."""
    torch.manual_seed(settings.seed)
    model = GPTNeoXForCausalLM(_config(settings, len(tokenizer)))
    model.train()
    ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay, fused=True
    )

    def schedule(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(range(settings.steps), desc=f"training tiny model ({len(tokenizer)} ids)", file=sys.stderr)
    losses: list[float] = []
    for _ in bar:
        starts = torch.randint(0, len(ids) - settings.context, (settings.batch,), generator=generator)
        batch = torch.stack([ids[s : s + settings.context] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
    return model.eval(), losses


@torch.no_grad()
def _heldout_perplexity(
    model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerBase, text: str, context: int
) -> tuple[float, int]:
    """Token-level perplexity over non-overlapping `context`-token windows (each window's first token is context
    only); returns (perplexity, predicted tokens). All logit rows count, the padding rows included."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):  # every window holds at least 2 tokens
        window = ids[start : start + context].unsqueeze(0)
        loss = model(input_ids=window, labels=window).loss
        total += loss.item() * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(total / count), count


def main(argv: list[str] | None = None) -> int:
    """`python -m quantkit.tiny own --out quantkit/tiny_model`: (re)train a variant into a folder."""
    parser = argparse.ArgumentParser(prog="python -m quantkit.tiny", description=main.__doc__)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced when training succeeds)")
    args = parser.parse_args(argv)
    settings = VARIANTS[args.variant]
    out = args.out.resolve()
    try:
        with _staged(out.with_name(out.name + ".new")) as staging:
            _build(staging, args.variant, settings, training_key(args.variant, settings))
    except QuantkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)
    os.rename(out.with_name(out.name + ".new"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
