"""The router's core: the request queue, KV block accounting, continuous batching and warmup."""
