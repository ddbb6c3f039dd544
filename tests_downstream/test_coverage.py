"""Every consumer that the format registry (quantkit/formats.py, copied into expected.json) names for a format is
proven: by this suite, by quantkit's main suite, or listed here with the reason it cannot be."""
from __future__ import annotations

from expected import expected

PROVEN_HERE = {  # (format, consumer) -> the test that proves it
    ("gptq", "vllm"): "test_vllm.py (offline LLM and the OpenAI-compatible server)",
    ("onnx", "optimum"): "test_onnx_consumers.py::test_optimum_*",
    ("onnx", "onnxruntime-genai"): "test_onnx_consumers.py::test_genai_*",
    ("onnx-int4", "optimum"): "test_onnx_consumers.py::test_optimum_*",
    ("onnx-int4", "onnxruntime-genai"): "test_onnx_consumers.py::test_genai_*",
}
PROVEN_IN_MAIN_SUITE = {
    ("gptq", "transformers"): "tests/test_gptq.py::test_plain_transformers_reload_matches_backend (plain "
                              "AutoModelForCausalLM) and quantkit's GPTQ backend, which is transformers + gptqmodel",
    ("onnx", "onnxruntime"): "quantkit's ONNX backend is onnxruntime: tests/test_onnx.py",
    ("onnx-int4", "onnxruntime"): "quantkit's ONNX backend is onnxruntime: tests/test_onnx_int4.py",
}
NOT_PROVEN = {("gptq", "tgi"): "TGI ships CUDA builds only: its loader's contract is checked field by field "
                               "(quantkit/downstream.py)"}


def test_every_registry_consumer_is_proven():
    named = {(entry["format"], consumer) for entry in expected()["artifacts"].values()
             for consumer in entry.get("consumers", ())}
    unproven = named - PROVEN_HERE.keys() - PROVEN_IN_MAIN_SUITE.keys() - NOT_PROVEN.keys()
    assert not unproven, f"registry consumers no test proves: {sorted(unproven)}"
