"""The keywords of a completion call, written once: `CompletionOptions`, and `takes_options`, which makes
`Llama.create_completion`'s and `create_chat_completion`'s signatures from its fields."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, Sequence, TypeVar

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

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)})


def takes_options(**defaults: Any) -> Callable[[Callable[[Any, Any, CompletionOptions], R]], Callable[..., R]]:
    """Let `method(self, first, options)` be called as `method(self, first, max_tokens=..., ...)`.

    CompletionOptions' fields become its parameters (positional or keyword; those after KW_ONLY keyword-only),
    with `defaults` replacing CompletionOptions' own. inspect and help() show that signature; a wrong call is
    Python's usual TypeError.
    """
    fields = dataclasses.fields(CompletionOptions)
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
