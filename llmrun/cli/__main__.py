"""`python -m llmrun.cli` runs the command line (the tests use it to get a fresh process)."""
from .commands import main

main()
