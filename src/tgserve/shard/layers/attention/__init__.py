"""Attention over the paged KV cache: explicit metadata, and the attention the models call."""

from tgserve.shard.layers.attention.metadata import AttentionMetadata
from tgserve.shard.layers.attention.paged import paged_attention

__all__ = ["AttentionMetadata", "paged_attention"]
