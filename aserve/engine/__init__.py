"""The engine: request state, scheduling, the block manager, the step loop and detokenization."""
