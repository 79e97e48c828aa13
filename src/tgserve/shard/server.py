"""Shard process entry: load the model for one rank and serve the gRPC contract on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
from pathlib import Path

import grpc
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, GenerationConfig

from tgserve.env import decode_ahead_max_batch, prefix_caching
from tgserve.memory import release_free_memory, recycle_step_buffers
from tgserve.pb import generate_pb2_grpc as pb_grpc
from tgserve.router.tracing import setup_tracing
from tgserve.shard.generator import Generator
from tgserve.shard.loading.loaders import DTYPES, load_model
from tgserve.shard.service import ShardSettings, TextGenerationService

log = logging.getLogger("tgserve.shard")

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 1GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def kv_budget(requested: int | None, device: torch.device, memory_fraction: float) -> int:
    if requested is not None:
        return requested
    free = available_memory(device) * memory_fraction
    if device.type == "cuda":
        return int(free * 0.9)
    # On the CPU the cache shares RAM with everything else: take a bounded share by default.
    return int(min(free * 0.3, 1.5 * 2**30))


def eos_token_ids(path: Path, tokenizer, config) -> frozenset[int]:  # type: ignore[no-untyped-def]
    ids: set[int] = set()
    for source in (_generation_config_eos(path), getattr(config, "eos_token_id", None),
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _generation_config_eos(path: Path):  # type: ignore[no-untyped-def]
    try:
        return GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tgserve shard", description=__doc__)
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--gguf-file", type=Path)
    p.add_argument("--uds-path", default="/tmp/tgserve-server")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "localhost"))
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    p.add_argument("--dtype")
    p.add_argument("--kv-cache-dtype", choices=sorted(DTYPES), help="default: the model's dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=parse_bytes)
    p.add_argument("--memory-fraction", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's choice)")
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--otlp-endpoint")
    p.add_argument("--otlp-service-name", default="text-generation-inference.server")
    return p.parse_args(argv)


def init_distributed(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", args.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if args.world_size > 1:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{args.master_addr}:{args.master_port}",
            rank=args.rank, world_size=args.world_size,
        )
    return device


async def serve(args: argparse.Namespace) -> None:
    recycle_step_buffers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed(args)
    model = load_model(args.model_path, device, args.dtype, args.rank, args.world_size,
                       gguf_file=args.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_path))
    release_free_memory()  # what loading freed (e.g. GGUF dequantization buffers): ~300 MB
    eos = eos_token_ids(args.model_path, tokenizer, model.config)
    kv_dtype = DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None
    generator = Generator(model, tokenizer, eos, args.block_size,
                          release_finished_kv=not prefix_caching(), kv_dtype=kv_dtype)
    urls = tuple(f"unix://{args.uds_path}-{r}" for r in range(args.world_size))
    settings = ShardSettings(
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        max_position_embeddings=int(getattr(model.config, "max_position_embeddings", 4096)
                                    or getattr(model.config, "n_positions", 4096)),
        kv_budget_bytes=kv_budget(args.kv_cache_memory, device, args.memory_fraction),
        urls=urls, rank=args.rank, world_size=args.world_size,
        decode_ahead_max_batch=decode_ahead_max_batch(),
    )
    tracing = setup_tracing(args.otlp_endpoint, args.otlp_service_name)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**31 - 1),
                                      ("grpc.max_send_message_length", 2**31 - 1)])
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(generator, settings, tracing.tracer if tracing else None), server
    )
    socket = f"{args.uds_path}-{args.rank}"
    if os.path.exists(socket):
        os.remove(socket)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    log.info("shard %d/%d ready on unix://%s", args.rank, args.world_size, socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shard %d stopping", args.rank)
    await server.stop(grace=2)
    if tracing is not None:
        tracing.shutdown()
    if os.path.exists(socket):
        os.remove(socket)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from tgserve.logs import setup_logging

    hf_logging.disable_progress_bar()  # progress bars would flood the launcher's log

    setup_logging(json_output=args.json_output, component=f"shard-{args.rank}")
    asyncio.run(serve(args))
    return 0
