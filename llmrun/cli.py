"""The `llmrun` command line (click). Commands are thin: they parse options and call the library."""
from __future__ import annotations

import functools
import sys

import click

from .errors import LlmrunError


def _one_line_errors(fn):
    """Turn every expected failure into one line on stderr and exit code 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlmrunError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (OSError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmrun")
def main():
    """llmrun: run and convert LLaMA-family GGUF models on the CPU."""


# Commands are added below by their owners: info, quantize, convert, run, chat, bench, perplexity.


if __name__ == "__main__":
    main()
