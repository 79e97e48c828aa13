"""Router: HTTP API, validation, queue, continuous batching and streaming; talks gRPC to shards."""
