"""Worker side of the engine: model runner, KV cache and sampler."""
