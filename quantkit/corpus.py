"""The tiny model's corpus: real English prose and dialogue held offline, every document rendered as a StableLM chat.

Sources, each cut into documents (one document = one chat, ended by `<|endoftext|>`):
  pydoc        the Python language reference in `pydoc_data.topics` (PSF license; every Python install has it),
               one document per reST section, a section title seen before dropped (topics overlap);
  wikitext     WikiText-2 raw *valid* (CC BY-SA 3.0), one document per article; never `wiki.test.raw`;
  hh-helpful   Anthropic HH-RLHF helpful-base *test* split (MIT), the `chosen` dialogues. The tiny model is trained
               on this split, so it must never be evaluated on `hh-helpful-test`; `hh-harmless-test` stays unseen;
  django       Django's documentation (BSD-3-Clause) from its pinned PyPI sdist (`quantkit.django_docs`), one
               document per titled section of the guides and reference (release notes left out), markup removed.
The held-out split is fixed by document: within each source, every 10th document (indices 9, 19, ...) is held out.
Prose documents become one turn: the user asks for the topic, the assistant's answer is the text.
"""
from __future__ import annotations

import re
from pathlib import Path

from quantkit import rest
from quantkit.chat import render_prompt
from quantkit.data import SHARED_RECORDS, SHARED_TEXT, hh_turns, read_records, read_text
from quantkit.django_docs import django_docs_dir
from quantkit.errors import QuantkitError
from quantkit.paths import data_dir

ENDOFTEXT = "<|endoftext|>"
HELDOUT_EVERY = 10
TRAINED_DIALOGUES = "hh-helpful-test"  # the one HH split the tiny model learns from (never evaluate it there)
DJANGO_PARTS = ("intro", "topics", "howto", "faq", "ref", "internals", "misc")  # not releases/: change logs
MIN_SECTION_CHARS = 200  # shorter Django sections are link lists and stubs
_REST_HEADING = re.compile(r"^(.+)\n([*=~-]+)\n", re.MULTILINE)  # a title underlined to its length
_WIKI_TITLE = re.compile(r"^ = ([^=].*?) = $", re.MULTILINE)  # " = Title = " (sections have == or more)


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    sections: dict[str, str] = {}
    for name in sorted(topics):
        text = topics[name].strip()
        starts = [m.start() for m in _REST_HEADING.finditer(text) if len(m.group(2)) == len(m.group(1))]
        for start, end in zip([0, *starts], [*starts, len(text)]):
            section = text[start:end].strip()
            if section:
                sections.setdefault(section.partition("\n")[0], section)
    return [one_turn(f"Explain {title}.", text) for title, text in sections.items()]


def wikitext_documents(data: Path) -> list[str]:
    text = read_text(data / SHARED_TEXT["wikitext2-valid"])
    matches = list(_WIKI_TITLE.finditer(text))
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return [one_turn(f"Tell me about {m.group(1)}.", text[m.end() : end].strip()) for m, end in zip(matches, ends)]


def dialogue_documents(data: Path) -> list[str]:
    documents = []
    for record in read_records(data / SHARED_RECORDS[TRAINED_DIALOGUES]):
        turns = hh_turns(record["chosen"])
        if not turns or [role for role, _ in turns] != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
            continue  # not strictly alternating user / assistant turns, ending with the assistant
        pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 2, 2)]
        documents.append(render_prompt(turns[-2][1], history=pairs) + turns[-1][1] + ENDOFTEXT)
    return documents


def django_documents(docs: Path) -> list[str]:
    documents = []
    for part in DJANGO_PARTS:
        for path in sorted((docs / part).rglob("*.txt")):
            for title, body in rest.sections(path.read_text(encoding="utf-8")):
                text = rest.plain(body)
                if len(text) >= MIN_SECTION_CHARS:
                    documents.append(one_turn(title if title.endswith("?") else f"Explain {title}.", text))
    return documents


def one_turn(question: str, answer: str) -> str:
    return render_prompt(question) + answer + ENDOFTEXT


def split(documents: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): every `HELDOUT_EVERY`-th document is held out."""
    heldout = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return train, heldout


def build_corpus(data: Path, django_docs: Path) -> tuple[str, str]:
    """(train text, held-out text) from the four sources: `data` is the shared data folder, `django_docs` the
    docs folder of Django's sdist."""
    train, heldout = [], []
    sources = (pydoc_documents(), wikitext_documents(data), dialogue_documents(data), django_documents(django_docs))
    for documents in sources:
        source_train, source_heldout = split(documents)
        train += source_train
        heldout += source_heldout
    return "".join(train), "".join(heldout)


def load_corpus() -> tuple[str, str]:
    """(train text, held-out text) from the shared data folder and Django's docs (downloaded on first use)."""
    shared = data_dir(required=False)
    if shared is None:
        raise QuantkitError("the tiny model's corpus needs the shared data folder (set QUANTKIT_DATA)")
    return build_corpus(shared, django_docs_dir())
