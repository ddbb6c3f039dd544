"""`quantkit bench --best`: which engine path runs an artifact fastest on this machine.

The paths of an artifact folder are the runner's backends for it and the exports it converts to (a GPTQ folder:
the GPTQ backend and onnx-int4 graphs; a dense folder: PyTorch in two dtypes and ONNX). Where quantkit's CPU decode
kernels run (quantkit.decode_kernels), the bf16 PyTorch and GPTQ paths are also tried without them
(`-library-kernels`: torch's and gptqmodel's kernels only), so the table shows what they are worth here. Every
export goes through its exporter into a scratch folder, so it is validated against the reference with the
exporter's own tolerance (a path that fails is reported, never timed). Each path's decode tokens/s is measured by quantkit.bench; the
fastest at the first batch size is `best`, and the fastest per batch size is `best_by_batch`.
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path
from typing import Callable

from quantkit import native
from quantkit.backends import Backend, artifact_kind, open_backend
from quantkit.bench import BenchSettings, copy_bandwidth_gbs, decode_speed
from quantkit.errors import QuantkitError
from quantkit.export.artifact import read_manifest
from quantkit.sources import default_device

Opener = Callable[[Path], tuple[Backend, dict | None]]  # scratch folder -> backend, its validation record


def manifest_validation(folder: Path) -> dict | None:
    try:
        return read_manifest(folder).get("validation")
    except QuantkitError:  # not written by quantkit: nothing recorded
        return None


def runner_backend(spec: str, device: str, dtype: str | None = None, native_kernels: bool = True) -> Opener:
    """A path that runs the folder itself on one of the runner's backends."""
    return lambda _: (open_backend(spec, dtype=dtype, device=device, native_kernels=native_kernels),
                      manifest_validation(Path(spec)))


def exported(export: Callable[[Path], Path], name: str, device: str) -> Opener:
    """A path through an exporter: export into the scratch folder (validated there), then open the result."""
    def open_(scratch: Path) -> tuple[Backend, dict | None]:
        folder = export(scratch / name)
        return open_backend(str(folder), device=device), manifest_validation(folder)
    return open_


def candidate_paths(folder: Path, device: str) -> dict[str, Opener]:
    """The engine paths of `folder` on `device`: name -> opener."""
    from quantkit.export.onnx import OnnxOptions, export_onnx
    from quantkit.export.onnx_int4 import Int4Options, export_onnx_int4

    cuda = device.startswith("cuda")
    with_and_without_kernels = not cuda and native.available()
    spec = str(folder)
    kind = artifact_kind(spec)
    if kind == "onnx":
        return {"onnx": runner_backend(spec, device)}
    paths: dict[str, Opener] = {}
    if kind == "gptq":
        int4 = {"onnx-int4-fp16": Int4Options()} if cuda else {
            "onnx-int4-fp32": Int4Options(dtype="fp32"),
            "onnx-int4-fp32-a4": Int4Options(dtype="fp32", accuracy_level=4)}
        paths["gptq"] = runner_backend(spec, device)
        if with_and_without_kernels:
            paths["gptq-library-kernels"] = runner_backend(spec, device, native_kernels=False)
        for name, options in int4.items():
            paths[name] = exported(lambda out, o=options: export_onnx_int4(spec, out, o), name, device)
        return paths
    onnx_dtype = "fp16" if cuda else "fp32"
    for dtype in ("fp16",) if cuda else ("bf16", "fp32"):
        paths[f"torch-{dtype}"] = runner_backend(spec, device, dtype)
        if dtype == "bf16" and with_and_without_kernels:
            paths["torch-bf16-library-kernels"] = runner_backend(spec, device, dtype, native_kernels=False)
    paths[f"onnx-{onnx_dtype}"] = exported(
        lambda out: export_onnx(spec, out, OnnxOptions(dtype=onnx_dtype, device=device)), f"onnx-{onnx_dtype}", device)
    return paths


def best_path(folder: Path, settings: BenchSettings, device: str | None = None) -> dict:
    """Every path's decode figures (or its error), `best` and `best_by_batch`, as a JSON-ready dict."""
    device = device or default_device()
    bandwidth = settings.bandwidth_gbs or copy_bandwidth_gbs(device)
    record: dict = {"model": str(folder), "device": device, "bandwidth_gbs": bandwidth, "paths": {}}
    with tempfile.TemporaryDirectory(prefix="quantkit-best-") as scratch:
        for name, open_ in candidate_paths(Path(folder), device).items():
            try:
                backend, validation = open_(Path(scratch))
            except QuantkitError as exc:  # an export that fails validation: reported, not timed
                record["paths"][name] = {"error": str(exc)}
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            decode = decode_speed(backend, settings, bandwidth)
            record["paths"][name] = {"backend": backend.name, "validation": validation,
                                     "decode_weight_bytes": backend.decode_weight_bytes, "decode": decode}
            print(f"{name}: " + ", ".join(f"batch {b} {d['median']:.1f} tok/s" for b, d in decode.items()),
                  file=sys.stderr, flush=True)
            del backend
            gc.collect()
    timed = {name: path["decode"] for name, path in record["paths"].items() if "decode" in path}
    if not timed:
        raise QuantkitError(f"no engine path for {folder} could be opened on {device}")
    by_batch = {str(b): max(timed, key=lambda n: timed[n][str(b)]["median"]) for b in settings.decode_batches}
    record["best_by_batch"] = by_batch
    record["best"] = by_batch[str(settings.decode_batches[0])]
    print(f"fastest on this machine: {record['best']}", file=sys.stderr)
    return record
