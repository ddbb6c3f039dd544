"""Where quantkit reads shared data and keeps its cache (both configurable by environment)."""
from __future__ import annotations

import os
from pathlib import Path

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
