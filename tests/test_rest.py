"""reST to plain prose (the tiny corpus' Django source), and fetching Django's docs from PyPI."""
from __future__ import annotations

import pytest

from quantkit import django_docs, rest
from quantkit.errors import QuantkitError

PAGE = """\
===================
How to use sessions
===================

.. module:: django.contrib.sessions
   :synopsis: Provides session management for Django projects.

Intro text, see :doc:`middleware </ref/middleware>` and :func:`~django.urls.reverse`.

.. _configuring-sessions:

Configuring the engine
======================

Set ``SESSION_ENGINE`` to **one** of :setting:`SESSION_ENGINE`'s values.

.. function:: get_session(request)

    Returns the session.

    .. versionadded:: 5.1

Not a title
==
"""


def test_sections_are_cut_at_underlined_titles_overlined_or_not():
    assert [title for title, _ in rest.sections(PAGE)] == ["How to use sessions", "Configuring the engine"]


def test_plain_keeps_what_a_reader_sees():
    (_, intro), (_, engine) = (title_body for title_body in rest.sections(PAGE))
    assert rest.plain(intro) == "Intro text, see middleware and reverse."  # module directive, option, label gone
    assert rest.plain(engine) == ("Set SESSION_ENGINE to one of SESSION_ENGINE's values.\n\n"
                                  "get_session(request)\n\n    Returns the session.\n\n    New in version 5.1.\n\n"
                                  "Not a title\n==")


def test_a_tampered_sdist_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(django_docs, "SDIST_SHA256", "0" * 64)
    with pytest.raises(QuantkitError, match=r"django-5\.2\.9\.tar\.gz from PyPI has sha256 16b5ccfc"):
        django_docs.django_docs_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["django-5.2.9-docs.lock"]
