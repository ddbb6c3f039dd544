"""The machine a figure was measured on: CPU, cores, memory, GPU and library versions."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import psutil
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    for package in ("torch", "transformers", "gptqmodel", "onnx", "onnxruntime", "onnxruntime-gpu", "quantkit"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return info


def machine_line(info: dict) -> str:
    gpu = info["gpu"] or "no GPU"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "gptqmodel", "onnxruntime") if k in info)
    return f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {gpu}; {versions}"
