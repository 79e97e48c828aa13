"""The router's core: queue, KV blocks, batching, warmup; pure Python, no protobuf, no torch."""
