"""The `llmrun` command line and its interactive chat loop."""
from .commands import main

__all__ = ["main"]
