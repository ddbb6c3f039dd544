"""What quantkit measured on its own artifacts (`python -m quantkit.serving_check`), and how a consumer's numbers
are held to it. Plain Python: it runs in every consumer's environment, none of which has quantkit."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent.parent / "build" / "downstream" / "expected.json"


@cache
def expected() -> dict:
    """expected.json from $QUANTKIT_DOWNSTREAM_EXPECTED (default build/downstream/expected.json)."""
    path = Path(os.environ.get("QUANTKIT_DOWNSTREAM_EXPECTED", DEFAULT))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `python -m quantkit.serving_check {path.parent}`")
    return json.loads(path.read_text())


def artifact(name: str) -> dict:
    """One artifact's entry; a broken copy's folder comes with the numbers of the good artifact it breaks."""
    root = Path(os.environ.get("QUANTKIT_DOWNSTREAM_EXPECTED", DEFAULT)).parent
    entry = expected()["artifacts"][name]
    numbers = expected()["artifacts"][entry["broken_of"]] if "broken_of" in entry else entry
    return {"continuation": expected()["continuation"], **numbers, **entry, "folder": str(root / entry["folder"])}


@dataclass(frozen=True)
class Tolerance:
    """Bounds on |consumer - quantkit| per scored token's log-prob: on the mean and on the largest."""

    mean: float
    max: float

    def holds(self, deltas: "Deltas") -> bool:
        return deltas.mean <= self.mean and deltas.max <= self.max


@dataclass(frozen=True)
class Deltas:
    mean: float
    max: float
    tokens: int

    def __str__(self) -> str:
        return f"mean |Δ log-prob| {self.mean:.2e}, max {self.max:.2e} over {self.tokens} tokens"


def deltas(actual: list[list[float]], wanted: list[list[float]]) -> Deltas:
    """|actual - wanted| over every scored token; the windows must have the same lengths."""
    assert [len(w) for w in actual] == [len(w) for w in wanted], "scored a different number of tokens"
    flat = [abs(a - b) for row_a, row_b in zip(actual, wanted) for a, b in zip(row_a, row_b)]
    return Deltas(sum(flat) / len(flat), max(flat), len(flat))


def assert_matches(actual: list[list[float]], wanted: list[list[float]], tolerance: Tolerance) -> Deltas:
    found = deltas(actual, wanted)
    print(f"agrees: {found}")
    assert tolerance.holds(found), f"{found} exceeds {tolerance}"
    return found


def assert_fails(actual: list[list[float]], wanted: list[list[float]], tolerance: Tolerance) -> Deltas:
    """The broken copy's log-probs must lie outside the tolerance the good artifact is held to."""
    found = deltas(actual, wanted)
    print(f"broken copy: {found}")
    assert not tolerance.holds(found), f"the broken copy passes: {found} is within {tolerance}"
    return found


def assert_same_continuation(tokens: list[int], case: dict, tolerance: Tolerance) -> None:
    """`tokens` (the stop token excluded) equal to quantkit's greedy continuation; the first difference is allowed
    only where quantkit saw a near-tie: a top-1 minus top-2 logit margin below twice the largest log-prob
    difference the consumer is allowed."""
    wanted = case["tokens"]
    for step, (got, want) in enumerate(zip(tokens, wanted)):
        if got != want:
            margin = case["margins"][step]
            assert margin < 2 * tolerance.max, (
                f"step {step}: token {got} where quantkit's runner chose {want} with a margin of {margin:.3f} "
                f"(ties allowed below {2 * tolerance.max:.3f}); so far {tokens[:step]}")
            print(f"diverged at step {step} at a near-tie (margin {margin:.4f})")
            return
    assert len(tokens) == len(wanted), f"{len(tokens)} tokens where quantkit's runner made {len(wanted)}: {tokens}"
