"""Plain prose from Sphinx reStructuredText sources: sections cut at their titles, markup taken out.

Hand-written because docutils parses whole documents into a tree and flags Sphinx's own roles and directives
(:setting:, .. versionadded::, ...) as errors, while the tiny model's corpus needs only each section's words as a
reader sees them.
"""
from __future__ import annotations

import re

TITLE = re.compile(r"^(\S.*)\n([=\-~^\"*#+]{3,})\n", re.MULTILINE)  # a title underlined at least to its length
ROLE = re.compile(r":[\w:.+-]+:`(?:([^`<]+?)\s*<[^`>]*>|([^`]+))`")  # :func:`x` -> x, :doc:`text <target>` -> text
DIRECTIVE = re.compile(r"^([ \t]*)\.\. ([\w:-]+)::[ \t]*(.*)$", re.MULTILINE)
DIRECTIVE_OPTION = re.compile(r"^[ \t]+:[\w-]+:(?:[ \t].*)?\n", re.MULTILINE)
LABEL = re.compile(r"^\.\. _[^:\n]+:[ \t]*\n", re.MULTILINE)
RULE = re.compile(r"^[-=~^\"*#+]{4,}[ \t]*\n", re.MULTILINE)  # overlines and transitions
VERSION_NOTES = {"versionadded": "New in version", "versionchanged": "Changed in version",
                 "deprecated": "Deprecated since version"}
SIGNATURES = {"function", "method", "class", "attribute", "data", "exception", "decorator", "classmethod",
              "staticmethod", "setting", "describe", "option", "envvar"}
ADMONITIONS = {"note", "warning", "seealso", "admonition", "tip"}


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of every titled section, in order; text before the first title is dropped."""
    titles = [m for m in TITLE.finditer(text) if len(m.group(2)) >= len(m.group(1).rstrip())]
    ends = [m.start() for m in titles[1:]] + [len(text)]
    return [(plain(m.group(1)).strip(), text[m.end() : end]) for m, end in zip(titles, ends)]


def plain(text: str) -> str:
    """`text` without roles, directive markers and their options, labels, rules and inline literals/emphasis."""
    text = LABEL.sub("", text)
    text = DIRECTIVE.sub(_directive, text)
    text = DIRECTIVE_OPTION.sub("", text)
    text = RULE.sub("", text)
    text = ROLE.sub(_role, text)
    text = re.sub(r"``([^`\n]+)``", r"\1", text)
    text = re.sub(r"\*\*([^*\n]+)\*\*", r"\1", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _role(match: re.Match) -> str:
    """A role's text: the title of `title <target>`, or the target (`~a.b.c` shows as `c`, as Sphinx does)."""
    title, target = match.groups()
    return title or (target[1:].rpartition(".")[2] if target.startswith("~") else target)


def _directive(match: re.Match) -> str:
    """A directive line as a reader sees it: a signature, a version note or an admonition's name; else nothing."""
    indent, name, argument = match.group(1), match.group(2).rpartition(":")[2], match.group(3).strip()
    if name in VERSION_NOTES:
        return f"{indent}{VERSION_NOTES[name]} {argument}."
    if name in SIGNATURES:
        return indent + argument
    if name in ADMONITIONS:
        return f"{indent}{argument or name.capitalize()}:"
    return ""
