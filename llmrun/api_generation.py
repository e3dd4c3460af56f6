"""`Llama`'s generation plumbing: a call's prompt tokens, its one grammar, its `n` generations and how they run
(the generation loop itself is generate.py; api.py shapes what comes out)."""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from . import api_args as args
from .completion_options import CompletionOptions
from .errors import LlmrunError
from .generate import Event, Generation, PerSlotModels, generate
from .llama_compat import completion_notes
from .results import prompt_logprobs
from .text.grammar import Grammar, GrammarError, as_grammar, response_format_grammar
from .text.sampling import Sampler


class GenerationMethods:
    """Mixed into `Llama` (api.py), whose lock, slot, tokenizer, model and random generator these use."""

    def _prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, (str, bytes, bytearray)):
            # Like llama-cli: BOS as the model asks, and control tokens written in the prompt are parsed.
            return list(self.tokenizer.encode(args.text(prompt, "prompt"), add_bos=None, special=True))
        return args.token_ids(prompt, self.n_vocab(), "prompt")

    def _echo_text(self, prompt, tokens: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, bytes):
            return prompt.decode("utf-8", errors="replace")
        return self.detokenize(tokens).decode("utf-8", errors="replace")

    def _echo_logprobs(self, tokens: list[int], top_n: int):
        # eval_logits leaves the prompt in the cache, so the generation after it evaluates one token again
        body = tokens[1:] if tokens and tokens[0] == self.tokenizer.bos_id else tokens
        rows = self.eval_logits(tokens)[len(tokens) - len(body):]
        return prompt_logprobs(body, rows, top_n)

    def _constraint(self, options: CompletionOptions, forced: Grammar | None = None) -> Grammar | None:
        """The one grammar a call asks for (grammar=, response_format=, or a forced tool call)."""
        given = [g for g in (forced, as_grammar(options.grammar), response_format_grammar(options.response_format))
                 if g is not None]
        if len(given) > 1:
            raise GrammarError("give one constraint: grammar, response_format or a forced tool call")
        return given[0] if given else None

    def _choices(self, tokens: list[int], options: CompletionOptions, grammar: Grammar | None,
                 top_n: int | None) -> Iterator[tuple[int, Event]]:
        """(choice index, event) for `options.n` generations from `tokens`, one after the other (later ones
        reuse the prompt's cache). Bad input raises now; the lock is held while a generation runs."""
        n = options.n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 128:
            raise LlmrunError(f"n must be an integer from 1 to 128, got {n!r}")
        if self.verbose:
            for note in completion_notes(options):
                print(f"llmrun: {note}", file=sys.stderr)
        # A call's own seed restarts the randomness (one generator for all its choices, so they differ);
        # otherwise this Llama's generator continues.
        rng = np.random.default_rng(args.seed(options.seed)) if options.seed is not None else self._rng
        return self._run_choices([self._generation(tokens, options, grammar, top_n, rng) for _ in range(n)])

    def _run_choices(self, generations: list[Generation]) -> Iterator[tuple[int, Event]]:
        """(choice index, event) of a call's generations, run here one after the other. The seam a server
        overrides to step them in its own KV-cache slots beside other requests' (server/host.py)."""
        def run():
            for index, gen in enumerate(generations):
                for event in self._run(gen):
                    yield index, event
        return run()

    def _generation(self, tokens, options: CompletionOptions, grammar: Grammar | None, top_n, rng) -> Generation:
        sampler = Sampler(options.sampling_params(), rng=rng)
        self._require_model()
        return Generation(tokens, self._slot, self.tokenizer, sampler, stop=args.stop_strings(options.stop),
                          max_tokens=options.max_tokens,
                          token_mask=grammar.matcher(self.tokenizer) if grammar is not None else None,
                          logit_bias=options.logit_bias, logprobs=top_n,
                          logits_processors=_callables(options.logits_processor, "logits_processor"),
                          stopping_criteria=_callables(options.stopping_criteria, "stopping_criteria"))

    def _run(self, gen: Generation) -> Iterator[Event]:
        with self._exclusive():
            self._running = gen
            self.last_timings = gen.timings
            try:
                yield from generate(PerSlotModels([self._require_model()]), gen)
            finally:
                self._running = None
                gen.close()
                if self.verbose:
                    self._print_timings()

    def _print_timings(self) -> None:
        t = self.last_timings
        pe, tp = t.get("n_prompt_eval", 0), t.get("t_prompt", 0.0)
        ng, tg = t.get("n_gen", 0), t.get("t_gen", 0.0)
        print(f"llmrun: prompt {t.get('n_prompt', 0)} tokens ({t.get('n_prompt_reused', 0)} reused, "
              f"{pe} evaluated in {tp * 1e3:.0f} ms, {pe / tp if tp > 0 else 0:.1f} tok/s); "
              f"generated {ng} tokens in {tg * 1e3:.0f} ms ({ng / tg if tg > 0 else 0:.1f} tok/s)",
              file=sys.stderr)


def _callables(value, name: str) -> list:
    """llama-cpp-python's logits_processor / stopping_criteria: None, one callable, or a list of them."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(callable(f) for f in items):
        raise LlmrunError(f"{name} must be a callable or a list of callables")
    return items


