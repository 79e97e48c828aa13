"""Launcher: resolves the model and configuration, spawns and supervises shards and the router."""
