"""Attention over the paged KV cache: explicit metadata and a registry of backends."""

from tgserve.shard.layers.attention.metadata import AttentionMetadata
from tgserve.shard.layers.attention.registry import get_backend

__all__ = ["AttentionMetadata", "get_backend"]
