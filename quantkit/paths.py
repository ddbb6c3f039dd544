"""Where quantkit reads shared data and keeps its cache (both configurable by environment)."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from quantkit.errors import QuantkitError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir(required: bool = True) -> Path | None:
    """The public data folder: $QUANTKIT_DATA, else ../shared/data beside the checkout."""
    folder = Path(os.environ.get("QUANTKIT_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if folder.is_dir():
        return folder
    if required:
        raise QuantkitError(f"shared data folder not found: {folder} (set QUANTKIT_DATA)")
    return None


def cache_dir() -> Path:
    """Cache for trained tiny models, reference log-probs and compiled kernels: $QUANTKIT_CACHE."""
    folder = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def output_folder(folder: Path) -> Path:
    """Create `folder` (and its parents) for writing, or fail in one line before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuantkitError(f"cannot create the output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise QuantkitError(f"output folder {folder} is not writable")
    return folder


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary path)`, then rename it over `path`: a failed or killed write leaves the old file (or
    none), never a half-written one. The temporary name keeps the suffix, for writers that go by it."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock across processes on `path` (created if absent); `on_wait` is called once when another
    process holds it and this one has to wait."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
