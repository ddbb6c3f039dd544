"""A tiny, really trained StableLM-Tuned-Alpha look-alike, so every export path can be checked on a laptop CPU.

The model is a scaled-down StableLM-Alpha (GPT-NeoX: rotary_pct 0.25, rotary base 10000, parallel residual,
untied embeddings, LayerNorm eps 1e-5, GELU, 4x MLP) trained from a fixed seed on one CPU thread (about 100 CPU
seconds; one thread keeps runs bit-reproducible). Its text is the one English corpus every Python install has
offline: the language reference in `pydoc_data.topics` (~465 KB; it differs between Python versions, so its hash
is part of the cache key). The topics are cut into their reST sections in sorted topic order; a section title seen
before is dropped, since topics overlap ("compound" repeats "if", "while", ...), so no held-out text is trained on.

Each section is one document, rendered in the StableLM chat format:
`render_prompt("Explain <title>.") + <section text> + "<|endoftext|>"`. The documents are concatenated with nothing
in between (the end-of-text token separates them). Every 10th document (indices 9, 19, ...) is held out.
`train.txt` and `heldout.txt` hold those two texts exactly as they are tokenized. Training draws fixed-length
windows at seeded random offsets of the token stream of `train.txt`. Held-out perplexity is token-level, over
non-overlapping windows of the training context length, and uses every logit row (the padding rows included).

Two variants, one architecture at two sizes (see `_VARIANTS`):
  "own"       a 4000-id byte-level BPE tokenizer trained on train.txt, laid out like StableLM's: <|endoftext|>=0,
              <|padding|>=1, ..., <|SYSTEM|>, <|USER|>, <|ASSISTANT|> as the last three ids;
  "stablelm"  the real StableLM-Tuned-Alpha tokenizer (50280 ids) from the shared data folder.
Embedding and head rows are padded to a multiple of 128 beyond the tokenizer, as in the real checkpoints.

`tiny_folder()` returns `<cache>/tiny-<variant>-<hash>/` holding `model/` (a normal HF checkpoint with tokenizer
files), `train.txt`, `heldout.txt` and `metrics.json` (held-out perplexity, train time, steps, sizes). The hash
covers every setting, the model config, the corpus bytes, the tokenizer file and VERSION: any change retrains.
"""
from __future__ import annotations

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
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from quantkit.chat import ASSISTANT_TOKEN, SYSTEM_TOKEN, USER_TOKEN, render_prompt
from quantkit.errors import QuantkitError
from quantkit.paths import cache_dir, data_dir, file_lock
from quantkit.sources import STABLELM_TOKENIZER, RandomShape, load_tokenizer

VERSION = 1  # bump when the training code changes in a way the settings do not show
ENDOFTEXT, PADDING = "<|endoftext|>", "<|padding|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
HELDOUT_EVERY = 10
ROW_MULTIPLE = 128
_HEADING = re.compile(r"^(.+)\n([*=~-]+)\n", re.MULTILINE)  # reST: a title underlined to its length


@dataclasses.dataclass(frozen=True)
class _Settings:
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


_VARIANTS = {
    "own": _Settings(vocab=4000, hidden=256, layers=2, heads=4, context=256, batch=8, steps=96, lr=6e-3, warmup=8),
    # The 50304-row head makes a token ~4x dearer even at half the width: smaller batches, fewer steps.
    "stablelm": _Settings(vocab=0, hidden=128, layers=2, heads=4, context=256, batch=4, steps=48, lr=1e-2, warmup=5),
}


def tiny_folder(tokenizer: str = "own") -> Path:
    """The cached tiny model folder for tokenizer "own" or "stablelm", trained (about 2 minutes) on first use."""
    if tokenizer not in _VARIANTS:
        raise QuantkitError(f"unknown tiny-model tokenizer '{tokenizer}' (choose from {', '.join(_VARIANTS)})")
    settings = _VARIANTS[tokenizer]
    train_text, heldout_text = _corpus()
    source = _stablelm_tokenizer_file() if tokenizer == "stablelm" else None
    architecture = _config(settings, settings.vocab).to_diff_dict()
    architecture.pop("transformers_version")
    key = {
        "version": VERSION,
        "variant": tokenizer,
        "settings": dataclasses.asdict(settings),
        "config": architecture,
        "corpus_sha256": hashlib.sha256((train_text + heldout_text).encode()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / f"tiny-{tokenizer}-{digest}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not folder.is_dir():
            with _staged(folder) as staging:
                _build(staging, tokenizer, settings, train_text, heldout_text, key)
    return folder


def _corpus() -> tuple[str, str]:
    """(train text, held-out text): pydoc topic sections rendered as chat turns, every 10th one held out."""
    from pydoc_data.topics import topics

    sections: dict[str, str] = {}  # title -> text; topics overlap ("compound" repeats "if", ...): keep the first
    for name in sorted(topics):
        text = topics[name].strip()
        starts = [m.start() for m in _HEADING.finditer(text) if len(m.group(2)) == len(m.group(1))]
        for start, end in zip([0, *starts], [*starts, len(text)]):
            section = text[start:end].strip()
            if section:
                sections.setdefault(section.partition("\n")[0], section)
    documents = [render_prompt(f"Explain {title}.") + text + ENDOFTEXT for title, text in sections.items()]
    heldout = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return "".join(train), "".join(heldout)


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


def _build(out: Path, variant: str, settings: _Settings, train_text: str, heldout_text: str, key: dict) -> None:
    (out / "train.txt").write_text(train_text, encoding="utf-8")
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    if variant == "stablelm":
        tokenizer = load_tokenizer(_stablelm_tokenizer_file().parent)
    else:
        tokenizer = _train_tokenizer(train_text, settings.vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        model, final_loss = _train(tokenizer, settings, train_text)
        train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        perplexity, tokens = _heldout_perplexity(model, tokenizer, heldout_text, settings.context)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    metrics = {
        "heldout_perplexity": perplexity,
        "heldout_tokens": tokens,
        "final_train_loss": final_loss,
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


def _config(settings: _Settings, tokenizer_size: int) -> GPTNeoXConfig:
    rows = math.ceil(tokenizer_size / ROW_MULTIPLE) * ROW_MULTIPLE
    config = RandomShape(hidden=settings.hidden, layers=settings.layers, heads=settings.heads, vocab_rows=rows).config()
    config.max_position_embeddings = settings.context  # what it was trained on
    # transformers 5 saves these as rope_parameters only; keep StableLM's own keys for older readers too.
    config.rotary_pct, config.rotary_emb_base = 0.25, 10000
    return config


def _train(
    tokenizer: PreTrainedTokenizerBase, settings: _Settings, train_text: str
) -> tuple[GPTNeoXForCausalLM, float]:
    """AdamW, linear warmup then cosine decay to 10%, on seeded random windows of the training tokens.

    Returns the model and the mean loss of the last 10 steps."""
    torch.manual_seed(settings.seed)
    model = GPTNeoXForCausalLM(_config(settings, len(tokenizer)))
    model.train()
    ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )

    def schedule(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(range(settings.steps), desc=f"training tiny model ({len(tokenizer)} ids)", file=sys.stderr)
    recent: deque[float] = deque(maxlen=10)
    for _ in bar:
        starts = torch.randint(0, len(ids) - settings.context, (settings.batch,), generator=generator)
        batch = torch.stack([ids[s : s + settings.context] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent.append(loss.item())
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
    return model.eval(), sum(recent) / len(recent)


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
