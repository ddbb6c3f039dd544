"""Django's documentation, the tiny model's fourth corpus source: the reST sources in Django's PyPI sdist
(BSD-3-Clause), pinned by version and sha256, downloaded once with pip and unpacked into the cache.

PyPI files never change once published, so the corpus (and the committed tokenizer built from it) stays
reproducible on any machine that reaches the package index.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.paths import cache_dir, file_lock

VERSION = "5.2.9"
SDIST = f"django-{VERSION}.tar.gz"
SDIST_SHA256 = "16b5ccfc5e8c27e6c0561af551d2ea32852d7352c67d452ae3e76b4f6b2ca495"


def django_docs_dir() -> Path:
    """The unpacked `docs/` folder of Django's sdist, fetched on first use."""
    folder = cache_dir() / f"django-{VERSION}-docs"
    with file_lock(cache_dir() / f"django-{VERSION}-docs.lock"):
        if not folder.is_dir():
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".django-docs-") as staging:
                _unpack_docs(_download_sdist(Path(staging)), Path(staging) / "docs")
                os.replace(Path(staging) / "docs", folder)
    return folder


def _download_sdist(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"django=={VERSION}", "--dest", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    sdist = into / SDIST
    if done.returncode or not sdist.is_file():
        reason = (done.stderr.strip().splitlines() or ["no sdist"])[-1]
        raise QuantkitError(f"could not download Django {VERSION}'s source from PyPI (the tiny model's corpus "
                            f"needs its docs): {reason}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise QuantkitError(f"{SDIST} from PyPI has sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def _unpack_docs(sdist: Path, out: Path) -> None:
    """Only the regular files under `django-VERSION/docs/`, paths checked to stay inside `out`."""
    prefix = f"django-{VERSION}/docs/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(prefix)]
        for member in members:
            member.name = member.name.removeprefix(prefix)
        archive.extractall(out, members=members, filter="data")
