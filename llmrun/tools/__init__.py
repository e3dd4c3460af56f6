"""Tools over whole files and models: re-quantization, benchmarks, perplexity."""
