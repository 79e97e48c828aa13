"""Shard process entry: load the model for one rank and serve the gRPC contract on a unix socket."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, GenerationConfig

from tgserve import uds
from tgserve.config import Config
from tgserve.env import child_config, decode_ahead_max_batch, prefix_caching
from tgserve.env import rank as env_rank
from tgserve.memory import recycle_step_buffers, release_free_memory
from tgserve.pb import generate_pb2_grpc as pb_grpc
from tgserve.shard.generator import Generator
from tgserve.shard.kernels import TORCH_OPS, select_ops
from tgserve.shard.loading.loaders import DTYPES, load_model
from tgserve.shard.sampling.params import Watermark
from tgserve.shard.service import ShardSettings, TextGenerationService
from tgserve.tracing import setup_tracing

log = logging.getLogger("tgserve.shard")

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


def eos_token_ids(path: Path, tokenizer, config) -> frozenset[int]:
    ids: set[int] = set()
    for source in (_generation_config_eos(path), getattr(config, "eos_token_id", None),
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _generation_config_eos(path: Path):
    try:
        return GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:
        return None


# Tokens per KV block: the router's block accounting and the shard's cache pages agree on it.
BLOCK_SIZE = 16


def init_distributed(config: Config, rank: int) -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if config.world_size > 1:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{config.master_addr}:{config.master_port}",
            rank=rank, world_size=config.world_size,
        )
    return device


async def serve(config: Config, rank: int) -> None:
    recycle_step_buffers()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = init_distributed(config, rank)
    assert config.model_path is not None, "the launcher resolves the model before the shards"
    model_path = Path(config.model_path)
    gguf_file = Path(config.gguf_file) if config.gguf_file else None
    kernels = TORCH_OPS
    if not config.disable_custom_kernels:
        # Built (or loaded from the cache) now, not during a request; a first build takes a while.
        began = time.perf_counter()
        log.info("shard %d: preparing the kernels for this device", rank)
        kernels = select_ops(device)
        log.info("shard %d: %s kernels ready in %.1fs", rank, kernels.name,
                 time.perf_counter() - began)
    log.info("shard %d: loading %s", rank, gguf_file.name if gguf_file else model_path)
    model = load_model(model_path, device, config.dtype, rank, config.world_size,
                       gguf_file=gguf_file, kernels=kernels)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    release_free_memory()  # what loading freed (e.g. GGUF dequantization buffers)
    eos = eos_token_ids(model_path, tokenizer, model.config)
    kv_dtype = DTYPES[config.kv_cache_dtype] if config.kv_cache_dtype else None
    generator = Generator(model, tokenizer, eos, BLOCK_SIZE,
                          release_finished_kv=not prefix_caching(), kv_dtype=kv_dtype,
                          watermark=Watermark(config.watermark_gamma, config.watermark_delta))
    urls = tuple(f"unix://{config.shard_socket(r)}" for r in range(config.world_size))
    settings = ShardSettings(
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        max_position_embeddings=int(getattr(model.config, "max_position_embeddings", 4096)
                                    or getattr(model.config, "n_positions", 4096)),
        kv_budget_bytes=kv_budget(config.kv_cache_memory, device, config.cuda_memory_fraction),
        urls=urls, rank=rank, world_size=config.world_size,
        decode_ahead_max_batch=decode_ahead_max_batch(),
    )
    tracing = setup_tracing(config.otlp_endpoint, config.shard_service_name)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**31 - 1),
                                      ("grpc.max_send_message_length", 2**31 - 1)])
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(generator, settings, tracing.tracer if tracing else None), server
    )
    socket = config.shard_socket(rank)
    # The launcher checked before it spawned this shard; another server's shard may have bound
    # the path since, while this one loaded its model.
    uds.remove_stale(socket)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    bound = uds.identity(socket)
    log.info("shard %d/%d ready on unix://%s", rank, config.world_size, socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shard %d stopping", rank)
    await server.stop(grace=2)
    if tracing is not None:
        tracing.shutdown()
    uds.remove_own(socket, bound)


def main(argv: list[str] | None = None) -> int:
    """`tgserve shard`: no flags of its own; the launcher's Config and RANK come in the
    environment."""
    if argv:
        raise SystemExit(f"tgserve shard takes no arguments (got {argv}); start `tgserve`")
    config, rank = child_config(), env_rank()
    from transformers.utils import logging as hf_logging

    from tgserve.logs import setup_logging

    hf_logging.disable_progress_bar()  # progress bars would flood the launcher's log

    setup_logging(json_output=config.json_output, component=f"shard-{rank}")
    try:
        asyncio.run(serve(config, rank))
    except uds.SocketInUse as e:
        log.error("--shard-uds-path %s: %s", config.shard_uds_path, e)
        return 1
    return 0
