"""Weight loading: the only place that shards or dequantizes tensors."""
