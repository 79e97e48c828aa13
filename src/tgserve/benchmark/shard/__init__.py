"""Microbenchmark of one shard over gRPC, without the router (like TGI's text-generation-benchmark).

Unlike the load generator around it, which talks HTTP to any server, this speaks tgserve's own
router<->shard contract: it uses the generated protobuf messages, the router's gRPC client and
the launcher's model resolution and process spawning.
"""
