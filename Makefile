# Two commands on a fresh machine: `make demo` (install + the tiny model end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/quantkit demo

test: install
	$(PY) -m pytest -q

# Retrain the committed tiny StableLM into quantkit/tiny_model/ (fixed seed, one thread; about 50 min of one core).
tiny-model: install
	$(PY) -m quantkit.tiny own --out quantkit/tiny_model

.PHONY: install demo test tiny-model
