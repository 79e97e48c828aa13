"""The router's core: the request queue, KV block accounting and continuous batching."""
