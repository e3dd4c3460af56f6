"""Text in and out of the engine: tokenizers, chat templates, sampling and stop strings."""
