"""The keywords of a completion call, written once: `CompletionOptions`, and `takes_options`, which makes
`Llama.create_completion`'s and `create_chat_completion`'s signatures from its fields."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

from .text.sampling import SamplingParams

R = TypeVar("R")


@dataclass(frozen=True)
class CompletionOptions:
    """The keywords both completion methods take, in their order, with create_completion's defaults (the
    sampler's own, which are llama.cpp's); the chat method replaces those of max_tokens and temperature."""
    max_tokens: int | None = 16      # None or <= 0: until end of generation or the context is full
    temperature: float = SamplingParams.temperature      # <= 0: greedy
    top_p: float = SamplingParams.top_p
    top_k: int = SamplingParams.top_k
    min_p: float = SamplingParams.min_p
    repeat_penalty: float = SamplingParams.repeat_penalty
    stop: str | Sequence[str] | None = None
    seed: int | None = None          # a fresh random generator from this seed; None: the Llama's goes on
    stream: bool = False
    _: KW_ONLY
    frequency_penalty: float = SamplingParams.frequency_penalty
    presence_penalty: float = SamplingParams.presence_penalty
    repeat_last_n: int = SamplingParams.repeat_last_n
    # structured output (text/grammar.py): GBNF text or a Grammar; OpenAI's / llama-cpp-python's response_format
    grammar: Any = None
    response_format: Mapping[str, Any] | None = None
    # completion: int N = logprobs with the top N; chat: bool, with top_logprobs = N
    logprobs: int | bool | None = None
    top_logprobs: int | None = None
    logit_bias: Mapping[int | str, float] | None = None
    n: int = 1                       # choices, generated one after the other from the same prompt
    # completion only: the prompt in front of the text, text appended after it
    echo: bool = False
    suffix: str | None = None
    # chat only (text/tool_calls.py); functions / function_call are OpenAI's older names for them
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    functions: Sequence[Mapping[str, Any]] | None = None
    function_call: str | Mapping[str, Any] | None = None
    # llama-cpp-python's: callables over (ids, logits); the model name put in the result
    logits_processor: Any = None
    stopping_criteria: Any = None
    model: str | None = None
    # llama-cpp-python's samplers this engine does not have: accepted, ignored (a note under verbose)
    typical_p: float = 1.0
    tfs_z: float = 1.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    # samplers llmrun lacks, with the value that leaves the output unchanged
    NEUTRAL: ClassVar[dict[str, Any]] = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0}
    COMPLETION_ONLY: ClassVar[tuple[str, ...]] = ("echo", "suffix")
    CHAT_ONLY: ClassVar[tuple[str, ...]] = ("tools", "tool_choice", "functions", "function_call", "top_logprobs")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)})


def takes_options(omit: Sequence[str] = (), **defaults: Any
                  ) -> Callable[[Callable[[Any, Any, CompletionOptions], R]], Callable[..., R]]:
    """Let `method(self, first, options)` be called as `method(self, first, max_tokens=..., ...)`.

    CompletionOptions' fields become its parameters (positional or keyword; those after KW_ONLY keyword-only),
    with `defaults` replacing CompletionOptions' own; fields named in `omit` are left out (they keep their
    defaults). inspect and help() show that signature; a wrong call is Python's usual TypeError.
    """
    fields = [f for f in dataclasses.fields(CompletionOptions) if f.name not in omit]
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"not CompletionOptions fields: {sorted(unknown)}")

    def decorate(method: Callable[[Any, Any, CompletionOptions], R]) -> Callable[..., R]:
        own = inspect.signature(method)
        head = list(own.parameters.values())[:2]      # self, and the prompt or the messages
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY if f.kw_only
                                    else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=defaults.get(f.name, f.default), annotation=f.type)
                  for f in fields]
        signature = own.replace(parameters=head + params)

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            return method(self, given[head[1].name], CompletionOptions(**{p.name: given[p.name] for p in params}))
        call.__signature__ = signature
        return call
    return decorate
