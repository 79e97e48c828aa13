"""A/B of two tgserve settings on one machine: the servers run one at a time, alternating.

Each variant is the same server with other environment variables, e.g. decoding ahead off and on:

  .venv/bin/python scripts/ab.py --a TGSERVE_DECODE_AHEAD_MAX_BATCH=0 \\
      --b TGSERVE_DECODE_AHEAD_MAX_BATCH=16 --rounds 3 --concurrency 1,16 --num-requests 8,32

Rounds alternate A, B, A, B, ... so that a machine that drifts (these do, by 10-30 % within an
hour) drifts under both; the table gives each variant's per-round figures and their medians.
`--random-model smollm2-135m` serves random weights of that shape (for a machine that has no
copy of the default model, such as a GPU host without the package registry), else the default
model or `--model-id`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2-135M-Instruct's shape (its config.json), for --random-model.
SHAPES = {
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(message: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_model(shape: str, folder: Path) -> Path:
    """Random weights of a known shape and a word-level tokenizer as large as its vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return folder


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pairs)


def run_variant(name: str, env: dict[str, str], args: argparse.Namespace, out: Path) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "tgserve.cli", "--hostname", "127.0.0.1", "--port", str(port),
               "--prometheus-port", str(free_port()), "--master-port", str(free_port()),
               "--shard-uds-path", tempfile.mktemp(prefix="tgs-ab-"), *args.server_args]
    if args.model_id:
        command += ["--model-id", str(args.model_id)]
    log(f"{name}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(command)}")
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, stdout=(out / "server.log").open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "TQDM_DISABLE": "1", **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no healthy server:\n"
                                   + (out / "server.log").read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        subprocess.run([sys.executable, "-m", "tgserve.cli", "benchmark", "--url", url,
                        "--name", name, "--server-pid", str(process.pid), "--api", "openai",
                        "--concurrency", args.concurrency, "--num-requests", args.num_requests,
                        "--num-prompts", "64", "--max-new-tokens", str(args.max_new_tokens),
                        "--ignore-eos", "--out-dir", str(out)],
                       check=True, stdout=(out / "table.txt").open("w"))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return json.loads((out / "benchmark.json").read_text())["servers"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", nargs="*", default=[], help="VAR=VALUE for variant A")
    p.add_argument("--b", nargs="*", default=[], help="VAR=VALUE for variant B")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--num-requests", default="8,32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model-id", type=Path)
    p.add_argument("--random-model", choices=sorted(SHAPES))
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench-results" / "ab")
    p.add_argument("server_args", nargs="*", help="after --: more launcher flags")
    args = p.parse_args(argv)
    if args.random_model:
        args.model_id = random_model(args.random_model, args.out_dir / f"model-{args.random_model}")
    variants = {"A": parse_env(args.a), "B": parse_env(args.b)}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            runs[name].append(run_variant(name, variants[name], args, args.out_dir / f"{name}{r}"))
    print(f"A: {variants['A']}\nB: {variants['B']}")
    levels = [lv["concurrency"] for lv in runs["A"][0]["levels"]]
    print(f"{'conc':>4}  {'metric':<12} {'A per round':<28} {'B per round':<28} "
          f"{'A med':>8} {'B med':>8} {'B/A':>6}")
    for i, conc in enumerate(levels):
        for metric, get in (("out tok/s", lambda lv: lv["output_tokens_per_s"]),
                            ("ITL p50 ms", lambda lv: 1000 * lv["itl_s"]["p50"]),
                            ("TTFT p50 ms", lambda lv: 1000 * lv["ttft_s"]["p50"])):
            a = [get(run["levels"][i]) for run in runs["A"]]
            b = [get(run["levels"][i]) for run in runs["B"]]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{conc:>4}  {metric:<12} {' '.join(f'{x:.1f}' for x in a):<28} "
                  f"{' '.join(f'{x:.1f}' for x in b):<28} {ma:>8.1f} {mb:>8.1f} {mb / ma:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
