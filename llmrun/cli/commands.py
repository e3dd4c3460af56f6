"""The `llmrun` command line (click). Commands are thin: they parse options and call the library."""
from __future__ import annotations

import functools
import sys

import click

from ..engine.archs import ARCHS   # a table only: no kernels imported
from ..errors import LlmrunError
from ..safe_text import printable, terminal_text


def _error(message: str) -> None:
    # messages quote file contents (keys, tensor names, template errors): escaped, and always one line
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(1)


def _one_line_errors(fn):
    """Turn every expected failure into one line on stderr and exit code 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LlmrunError, OSError, ValueError) as e:
            _error(str(e))
        except MemoryError:
            _error("out of memory")
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as e:  # a bug: still one line (the fuzz tests treat this message as a failure)
            _error(f"internal error ({type(e).__name__}): {e}")
    return wrapper


def _echo_generated(text: str) -> None:
    """Model output: raw into a pipe, control characters escaped on a terminal (a vocabulary may hold ESC)."""
    click.echo(terminal_text(text) if sys.stdout.isatty() else text, nl=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmrun")
def main():
    """llmrun: run and convert LLaMA-family GGUF models on the CPU."""
    import numpy as np

    # Overflowing weights are reported as one error (the engine checks its logits); numpy's own
    # RuntimeWarnings on the way there would be stray lines on stderr.
    np.seterr(over="ignore", invalid="ignore", divide="ignore")


# Commands are added below by their owners: info, quantize, convert, run, chat, bench, perplexity.


@main.command("info", help="Metadata and tensor table of the GGUF FILE, and whether llmrun runs its architecture "
                            f"({', '.join(ARCHS)}).")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the report")
@_one_line_errors
def info(file, as_json):
    import json

    from ..gguf import GGUFReader
    from ..gguf.describe import describe, describe_text

    with GGUFReader(file) as r:
        click.echo(json.dumps(describe(r, list(ARCHS)), indent=1) if as_json else describe_text(r, list(ARCHS)))


@main.command("quantize")
@click.argument("input_path", metavar="IN", type=click.Path())
@click.argument("output_path", metavar="OUT", type=click.Path())
@click.option("-t", "--type", "file_type", required=True,
              help="target file type: q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, f16, ...")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@_one_line_errors
def quantize(input_path, output_path, file_type, force):
    """Re-quantize the GGUF model IN to OUT (2-D weights per llama.cpp's mix rules, norms stay f32)."""
    import os
    from collections import Counter

    from ..tools.requantize import requantize

    show = sys.stderr.isatty()

    def progress(i, n, name, qtype):
        if show:
            click.echo(f"\r[{i + 1:>4}/{n}] {qtype.lower:<7} {printable(name):<48}", err=True, nl=False)

    chosen = requantize(input_path, output_path, file_type, overwrite=force, progress=progress)
    if show:
        click.echo("", err=True)
    counts = ", ".join(f"{t}: {c}" for t, c in Counter(t.lower for t in chosen.values()).most_common())
    mb_in, mb_out = os.path.getsize(input_path) / 1e6, os.path.getsize(output_path) / 1e6
    click.echo(f"wrote {output_path}: {file_type.lower()}, {len(chosen)} tensors ({counts}), "
               f"{mb_in:.1f} MB -> {mb_out:.1f} MB")


@main.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=128, show_default=True,
              help="prompt tokens, evaluated in one batch from an empty cache (prefill)")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=32, show_default=True,
              help="tokens generated one at a time after the prompt (decode)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="worker threads (default: all cores)")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True,
              help="timed passes after one warm-up pass; the median is reported")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@_one_line_errors
def bench(model, n_prompt, n_gen, threads, repetitions, as_json):
    """Prefill and decode throughput (tokens/s) of MODEL, llama-bench style."""
    import json

    from ..tools.bench import bench_file, format_result

    result = bench_file(model, n_prompt=n_prompt, n_gen=n_gen, threads=threads, repetitions=repetitions)
    click.echo(json.dumps(result.to_json()) if as_json else format_result(result))


# ---- run / chat / perplexity (API helper) -----------------------------------------------------------------
def _sampling_options(fn):
    """Sampling flags shared by `run` and `chat`; defaults are llama.cpp's."""
    options = [
        click.option("--temp", "temperature", type=float, default=0.8, show_default=True,
                     help="temperature; 0 = greedy"),
        click.option("--top-k", type=int, default=40, show_default=True, help="keep the K most likely (0 = off)"),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True,
                     help="nucleus sampling mass (1 = off)"),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True,
                     help="drop tokens below P x the best token's probability (0 = off)"),
        click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="penalise the last 64 tokens (1 = off)"),
        click.option("--seed", type=int, default=None, help="random seed (default: random)"),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="worker threads (default: physical cores)"),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=0), default=4096, show_default=True,
                     help="context window in tokens (0 = the model's training context)"),
        click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=-1, show_default=True,
                     help="max tokens to generate (-1 = until end of text or the context is full)"),
        click.option("-v", "--verbose", is_flag=True, help="detailed timings on stderr"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load_llama(model, n_ctx, threads, seed, verbose, loras=(), cache_types=(None, None)):
    from ..api import Llama
    from .paths import resolve_model

    llm = Llama(resolve_model(model), n_ctx=n_ctx, n_threads=threads, seed=seed, verbose=verbose,
                type_k=cache_types[0], type_v=cache_types[1])
    if loras:
        from llmrun.convert.lora import parse_lora_arg
        llm.set_lora([parse_lora_arg(a) for a in loras])
    return llm


_KV_TYPES = click.Choice(["f32", "f16", "q8_0"], case_sensitive=False)


def _cache_type_options(fn):
    """--cache-type-k / --cache-type-v (llama.cpp's names): how the KV cache stores K and V."""
    fn = click.option("--cache-type-v", "cache_type_v", type=_KV_TYPES, default="f16", show_default=True,
                      help="KV cache type of V (f16 halves the f32 cache; q8_0 quarters it, less exact)")(fn)
    return click.option("--cache-type-k", "cache_type_k", type=_KV_TYPES, default="f16", show_default=True,
                        help="KV cache type of K")(fn)


def _lora_option(fn):
    return click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
                        help="LoRA adapter applied at run time: a GGUF LoRA file or a PEFT folder, scale 1.0 "
                             "(repeatable)")(fn)


def _sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, n_predict):
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                max_tokens=n_predict if n_predict > 0 else None)


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """-p TEXT, -p - (stdin) or -f FILE: exactly one of them."""
    if (prompt is None) == (prompt_file is None):
        raise LlmrunError("give the prompt with -p TEXT, -p - (standard input) or -f FILE (one of them)")
    if prompt_file is not None:
        with open(prompt_file, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    if prompt == "-":
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    return prompt


def _grammar_option(grammar_file: str | None, json_schema: str | None):
    """--grammar-file FILE (GBNF) or --json-schema JSON_OR_FILE, compiled (one-line error if invalid)."""
    import os

    from ..text.grammar import Grammar

    if grammar_file and json_schema:
        raise LlmrunError("give --grammar-file or --json-schema, not both")
    if grammar_file:
        return Grammar.from_file(grammar_file)
    if json_schema:
        text = json_schema
        if not text.lstrip().startswith(("{", "true", "false")) and os.path.exists(text):
            with open(text, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        return Grammar.from_json_schema(text)
    return None


@main.command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", default=None,
              help="the text to complete, or - to read it from standard input (not echoed: stdout is only the "
                   "completion)")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="read the prompt from this file")
@click.option("--stop", "stops", multiple=True, metavar="S", help="stop before this text (repeatable)")
@click.option("--grammar-file", type=click.Path(dir_okay=False), default=None,
              help="constrain the output to a GBNF grammar (llama.cpp's format)")
@click.option("--json-schema", default=None, metavar="JSON_OR_FILE",
              help="constrain the output to JSON valid under this schema (inline JSON or a file)")
@_sampling_options
@_cache_type_options
@_lora_option
@_one_line_errors
def run(model, prompt, prompt_file, stops, grammar_file, json_schema, temperature, top_k, top_p, min_p,
        repeat_penalty, seed, threads, n_ctx, n_predict, verbose, cache_type_k, cache_type_v, loras):
    """Complete PROMPT with MODEL (default model if omitted), streaming the text to stdout."""
    from .signals import sigint_cancels

    text = _read_prompt(prompt, prompt_file)
    grammar = _grammar_option(grammar_file, json_schema)
    llm = _load_llama(model, n_ctx, threads, seed, verbose, loras, (cache_type_k, cache_type_v))
    if n_predict == 0:
        return
    finish, ended_line = None, False
    with sigint_cancels(llm):   # Ctrl-C ends the completion cleanly
        for chunk in llm.create_completion(text, stream=True, seed=seed, stop=list(stops) or None, grammar=grammar,
                                           **_sampling_kwargs(temperature, top_k, top_p, min_p,
                                                              repeat_penalty, n_predict)):
            choice = chunk["choices"][0]
            _echo_generated(choice["text"])
            finish = choice["finish_reason"] or finish
            if finish and not ended_line:
                # end the text's line now, before the timing line `-v` prints when the generation closes
                click.echo()
                ended_line = True
            sys.stdout.flush()
    if not ended_line:
        click.echo()
    if verbose:
        click.echo(f"finish_reason: {finish}", err=True)


@main.command("chat")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--system", default=None, help="system prompt")
@_sampling_options
@_cache_type_options
@_lora_option
@_one_line_errors
def chat(model, system, temperature, top_k, top_p, min_p, repeat_penalty, seed, threads, n_ctx, n_predict, verbose,
         cache_type_k, cache_type_v, loras):
    """Multi-turn chat with MODEL (default model if omitted) using its chat template.

    Type a message per line; /reset, /system TEXT, /exit. Works with piped stdin.
    """
    from .chat_session import ChatSession

    llm = _load_llama(model, n_ctx, threads, seed, verbose, loras, (cache_type_k, cache_type_v))
    sampling = _sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, n_predict)
    sys.exit(ChatSession(llm, system=system, sampling=sampling).run())


@main.command("perplexity")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False),
              help="text file to score")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=4), default=512, show_default=True,
              help="window size in tokens (llama.cpp's usual -c 512)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="worker threads (default: physical cores)")
@_one_line_errors
def perplexity_cmd(model, text_file, n_ctx, threads):
    """Perplexity of MODEL on TEXT_FILE, llama.cpp-style (windows of --ctx tokens, second halves scored)."""
    from .paths import resolve_model
    from ..tools.perplexity import perplexity_of_file

    def progress(i, n, ppl):
        click.echo(f"[{i}]{ppl:.4f}," + ("\n" if i == n else ""), err=True, nl=False)

    r = perplexity_of_file(resolve_model(model), text_file, n_ctx=n_ctx, n_threads=threads, progress=progress)
    click.echo(f"PPL = {r.ppl:.4f} +/- {r.err:.5f}  ({r.n_chunks} chunks of {n_ctx} tokens, "
               f"{r.n_scored} tokens scored)")


@main.command("convert")
@click.argument("hf_dir", metavar="HF_DIR", type=click.Path())
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="the GGUF file to write")
@click.option("-t", "--type", "out_type", default="f16", show_default=True,
              help="f32, f16, bf16, or a quantization such as q8_0, q4_0, q4_k_m")
@click.option("--lora", "loras", multiple=True, metavar="DIR[:SCALE]",
              help="PEFT LoRA adapter folder merged into the weights (repeatable, applied in order; scale 1.0)")
@click.option("--force", is_flag=True, help="replace the output file if it exists")
@_one_line_errors
def convert(hf_dir, output_path, out_type, loras, force):
    """Convert a Hugging Face LLaMA checkpoint in HF_DIR (+ LoRA adapters, merged) to one GGUF file."""
    import os
    import time

    from llmrun.convert import convert_checkpoint
    from llmrun.convert.lora import parse_lora_arg

    show = sys.stderr.isatty()

    def progress(i, n, name):
        if show:
            click.echo(f"\r[{i:>4}/{n}] {name:<40}", err=True, nl=False)

    t0 = time.perf_counter()
    convert_checkpoint(hf_dir, output_path, out_type=out_type, loras=[parse_lora_arg(a) for a in loras],
                       overwrite=force, progress=progress)
    if show:
        click.echo("", err=True)
    click.echo(f"wrote {output_path} ({out_type.lower()}, {os.path.getsize(output_path) / 1e6:.1f} MB"
               f"{', %d LoRA adapter(s) merged' % len(loras) if loras else ''}) in {time.perf_counter() - t0:.1f} s")



@main.command("convert-lora")
@click.argument("adapter_dir", metavar="ADAPTER_DIR", type=click.Path())
@click.option("-o", "--output", "output_path", required=True, type=click.Path(), help="the GGUF LoRA file to write")
@click.option("--base", "base_dir", type=click.Path(), default=None,
              help="the base model's HF folder (its config.json: head counts for Q/K, shapes to check)")
@click.option("-t", "--type", "out_type", default="f32", show_default=True, help="f32, f16 or q8_0")
@click.option("--force", is_flag=True, help="replace the output file if it exists")
@_one_line_errors
def convert_lora(adapter_dir, output_path, base_dir, out_type, force):
    """Write the PEFT LoRA adapter in ADAPTER_DIR as a GGUF LoRA file (llama.cpp's --lora format)."""
    import os

    from llmrun.convert.lora_gguf import export_lora

    export_lora(adapter_dir, output_path, base_dir=base_dir, out_type=out_type, overwrite=force)
    click.echo(f"wrote {output_path} ({out_type.lower()} LoRA, {os.path.getsize(output_path) / 1e6:.2f} MB)")


@main.command("serve")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (loopback only by default; 0.0.0.0 for every interface)")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port (0: any free)")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="sequences generated at once (KV-cache slots sharing the weights)")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=0), default=4096, show_default=True,
              help="context window of each slot in tokens (0 = the model's training context)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="worker threads (default: all cores)")
@click.option("--api-key", envvar="LLMRUN_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' on every endpoint (or set LLMRUN_API_KEY)")
@click.option("--alias", default=None, help="the model name clients see (default: the file name)")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN",
              help="let web pages from ORIGIN call the API (repeatable; '*' for any); off by default")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait for a free slot; more get 503 with Retry-After")
@click.option("--max-body", "max_body", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="largest request body in bytes (413 beyond)")
@click.option("-v", "--verbose", is_flag=True, help="log each request's method, path and status (never its content)")
@_cache_type_options
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE][@ALIAS]",
              help="LoRA adapter loaded at start (GGUF LoRA file or PEFT folder; repeatable): without ALIAS applied "
                   "to every request at SCALE (default 1.0); with ALIAS only to requests naming ALIAS as their model")
@_one_line_errors
def serve_cmd(model, host, port, parallel, n_ctx, threads, api_key, alias, cors, max_queue, max_body, verbose,
              cache_type_k, cache_type_v, loras):
    """Serve MODEL over HTTP: OpenAI (/v1/...) and Ollama (/api/...) endpoints and a chat page at /.

    Requests run together (continuous batching, --parallel slots); SIGTERM or Ctrl-C stops accepting new
    ones and lets running ones finish.
    """
    from ..server import ServerConfig, serve
    from ..server.adapters import parse_lora_option
    from .paths import resolve_model

    config = ServerConfig(host=host, port=port, api_key=api_key or None, cors_origins=tuple(cors),
                          max_body_bytes=max_body, max_queue=max_queue, log_requests=verbose)
    serve(resolve_model(model), config, n_ctx=n_ctx, n_threads=threads, parallel=parallel, alias=alias,
          loras=[parse_lora_option(a) for a in loras], announce=lambda line: click.echo(line, err=True),
          cache_types=(cache_type_k, cache_type_v))
