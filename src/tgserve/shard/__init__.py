"""Shard: holds weights and KV cache, runs prefill/decode, samples and detokenizes."""
