#!/usr/bin/env bash
# The CUDA path, on a machine with a GPU (CI has none; run it where one is):
#   1. the engine on the GPU against transformers on the CPU (greedy tokens, logprobs, every
#      architecture, requests joining and leaving, decoding ahead), float32;
#   2. a live server whose shard takes the GPU (its default device) against transformers;
#   3. decoding ahead off and on (A/B, alternating) on random weights of the default model's
#      shape in bfloat16: there the forward runs on the GPU while the CPU handles the router.
#
#   scripts/cuda_check.sh [OUT_DIR]        (PYTHON=... picks the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${1:-${OUT:-/tmp/cuda-check}}"
mkdir -p "$OUT"
export TQDM_DISABLE=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, torch.cuda.get_device_name())' || exit 1
rc=0
TGSERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -p no:warnings -rs \
  tests/golden/test_architectures.py tests/golden/test_engine_behaviour.py \
  tests/golden/test_decode_ahead.py tests/integration/test_live_reference.py \
  2>&1 | tee "$OUT/pytest.log" || rc=1
"$PY" scripts/ab.py --random-model smollm2-135m --out-dir "$OUT/ab" --rounds 2 \
  --a TGSERVE_DECODE_AHEAD_MAX_BATCH=0 --b TGSERVE_DECODE_AHEAD_MAX_BATCH=16 \
  --concurrency 1,4,16 --num-requests 8,16,32 -- --dtype bfloat16 --kv-cache-memory 4GiB \
  2>&1 | tee "$OUT/ab.log" || rc=1
exit $rc
