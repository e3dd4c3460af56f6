"""The engine room: the model graph over quantized weights, and its KV cache."""
