"""Short content fingerprints for cache keys and stage skipping."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(model: str) -> str:
    """A model's identity: file names, sizes and mtimes of a folder, else the spec (presets are seeded)."""
    folder = Path(model)
    if folder.is_dir():
        return fingerprint(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in folder.rglob("*") if p.is_file()))
    return fingerprint(model)
