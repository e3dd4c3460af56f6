"""The generation loop's seams (generate.py): several sequences stepped with one batched forward per step, and
the token mask between logits and sampling.

Scripted fakes give exact control over calls and outputs; the default SmolLM2 model checks that stepping
sequences together changes none of their tokens and that a mask really steers greedy decoding.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers.fake_llm import EOS, ByteTokenizer, ScriptedModel
from llmrun.engine.model import LlamaModel
from llmrun.errors import LlmrunError
from llmrun.generate import PROMPT_CHUNK, CacheSlot, Generation, PerSlotModels, generate, step
from llmrun.gguf import GGUFReader
from llmrun.protocols import BatchModel, SequenceModel, TokenizerLike, TokenMask
from llmrun.text.sampling import Sampler, SamplingParams
from llmrun.text.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


class CountingBatch:
    """A BatchModel wrapper that records each forward_batch call as [(slot, pos, n_tokens), ...]."""

    def __init__(self, inner):
        self.inner, self.n_slots, self.n_ctx = inner, inner.n_slots, inner.n_ctx
        self.calls: list[list[tuple[int, int, int]]] = []

    def forward_batch(self, batch):
        self.calls.append([(item.slot, item.pos, len(item.tokens)) for item in batch])
        return self.inner.forward_batch(batch)


class Forbid:
    """A TokenMask forbidding some ids; records what the loop told it was accepted."""

    def __init__(self, n_vocab, forbidden=()):
        self.mask = np.ones(n_vocab, dtype=bool)
        self.mask[list(forbidden)] = False
        self.accepted: list[int] = []

    def allowed(self):
        return self.mask

    def accept(self, token):
        self.accepted.append(token)


def fake_generation(prompt: str, slot: CacheSlot, **kw) -> Generation:
    tok = ByteTokenizer()
    return Generation(tok.encode(prompt, special=True), slot, tok, Sampler(GREEDY), **kw)


def text_of(events, gen) -> str:
    return "".join(e.text for e in events if e.generation is gen)


# ---- several sequences, one forward per step (fakes) -------------------------------------------------------
def test_two_sequences_share_each_forward_call():
    engine = CountingBatch(PerSlotModels([ScriptedModel(b"Hello"), ScriptedModel(b"Bye now")]))
    a, b = fake_generation("A<|go|>", CacheSlot(0, 64)), fake_generation("B<|go|>", CacheSlot(1, 64))
    events = list(generate(engine, a, b))
    assert (text_of(events, a), text_of(events, b)) == ("Hello", "Bye now")
    assert (a.finish_reason, b.finish_reason) == ("stop", "stop")
    assert a.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    # step 1 feeds both prompts in one call; then both feed one token per call until "Hello" has ended
    # (its EOS is sampled, never fed), then only the second sequence
    assert engine.calls[0] == [(0, 0, 3), (1, 0, 3)]
    assert engine.calls[1] == [(0, 3, 1), (1, 3, 1)]
    assert [len(c) for c in engine.calls] == [2] * 6 + [1] * 2
    assert [e.finish_reason for e in events if e.finish_reason] == ["stop", "stop"]


def test_long_prompt_is_fed_in_chunks_beside_a_decoding_sequence():
    long_prompt = "x" * (PROMPT_CHUNK + 10) + "<|go|>"       # BOS + 266 bytes + <|go|>
    n_long = PROMPT_CHUNK + 12
    engine = CountingBatch(PerSlotModels([ScriptedModel(b"ab", n_ctx=1024), ScriptedModel(b"ok", n_ctx=1024)]))
    short, long = fake_generation("Q<|go|>", CacheSlot(0, 1024)), fake_generation(long_prompt, CacheSlot(1, 1024))
    events = list(generate(engine, short, long))
    assert engine.calls[0] == [(0, 0, 3), (1, 0, PROMPT_CHUNK)]
    assert engine.calls[1] == [(0, 3, 1), (1, PROMPT_CHUNK, n_long - PROMPT_CHUNK)]
    assert (text_of(events, short), text_of(events, long)) == ("ab", "ok")
    assert long.timings["n_prompt_eval"] == n_long


def test_cancelling_one_sequence_leaves_the_other_running():
    engine = PerSlotModels([ScriptedModel(b"ab", n_ctx=1000, after="cycle"), ScriptedModel(b"hello")])
    a, b = fake_generation("A<|go|>", CacheSlot(0, 1000)), fake_generation("B<|go|>", CacheSlot(1, 64))
    events = step(engine, [a, b]) + step(engine, [a, b])     # prompts, then one token each
    a.cancel()
    events += list(generate(engine, a, b))
    assert (a.finish_reason, b.finish_reason) == ("cancelled", "stop")
    assert a.generated == [ord("a")] and text_of(events, b) == "hello"


def test_one_slot_cannot_serve_two_running_sequences():
    engine = PerSlotModels([ScriptedModel(b"x")])
    slot = CacheSlot(0, 64)
    with pytest.raises(LlmrunError, match="slot"):
        step(engine, [fake_generation("A<|go|>", slot), fake_generation("B<|go|>", slot)])


def test_bad_max_tokens_is_one_line_error():
    with pytest.raises(LlmrunError, match="max_tokens"):
        fake_generation("A<|go|>", CacheSlot(0, 64), max_tokens="many")


# ---- the token mask (fakes) --------------------------------------------------------------------------------
def test_mask_is_told_every_sampled_token_and_can_forbid_the_end():
    engine = PerSlotModels([ScriptedModel(b"Hi", n_ctx=64, after=EOS)])
    mask = Forbid(ByteTokenizer.n_vocab)
    gen = fake_generation("A<|go|>", CacheSlot(0, 64), token_mask=mask)
    list(generate(engine, gen))
    assert mask.accepted == [ord("H"), ord("i"), EOS]     # the end-of-generation token too

    # forbidding EOS: greedy takes the best allowed token instead (all others tie at 0: the lowest id)
    mask = Forbid(ByteTokenizer.n_vocab, forbidden=[EOS])
    gen = fake_generation("A<|go|>", CacheSlot(0, 64), token_mask=mask, max_tokens=4)
    list(generate(engine, gen))
    assert gen.generated == [ord("H"), ord("i"), 0, 0] and gen.finish_reason == "length"


@pytest.mark.parametrize("mask, match", [(np.zeros(ByteTokenizer.n_vocab, bool), "allows no token"),
                                         (np.ones(7, bool), "shape")])
def test_bad_mask_is_one_line_error(mask, match):
    class Fixed(Forbid):
        def allowed(self):
            return mask
    gen = fake_generation("A<|go|>", CacheSlot(0, 64), token_mask=Fixed(ByteTokenizer.n_vocab))
    with pytest.raises(LlmrunError, match=match):
        list(generate(PerSlotModels([ScriptedModel(b"x")]), gen))


# ---- the real default model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_parts(default_model):
    """The default model's tokenizer and two engines over one file (today's engine has one cache each)."""
    reader = GGUFReader(default_model)
    try:
        yield Tokenizer.from_metadata(reader.metadata), [LlamaModel.load(reader, n_ctx=96) for _ in range(2)]
    finally:
        reader.close()


def test_real_classes_and_fakes_fit_the_protocols(smollm_parts):
    tokenizer, models = smollm_parts
    assert isinstance(tokenizer, TokenizerLike) and isinstance(ByteTokenizer(), TokenizerLike)
    assert isinstance(models[0], SequenceModel) and isinstance(ScriptedModel(b"x"), SequenceModel)
    assert isinstance(PerSlotModels(models), BatchModel) and isinstance(Forbid(3), TokenMask)
    assert not isinstance(object(), SequenceModel)


def _greedy(tokenizer, prompt: str, slot: CacheSlot, **kw) -> Generation:
    return Generation(tokenizer.encode(prompt, add_bos=None, special=True), slot, tokenizer, Sampler(GREEDY),
                      max_tokens=kw.pop("max_tokens", 12), **kw)


def test_sequences_stepped_together_give_the_tokens_each_gives_alone(smollm_parts):
    tokenizer, (m0, m1) = smollm_parts
    prompts = ["The capital of France is", "def fibonacci(n):"]
    alone = []
    for prompt in prompts:
        gen = _greedy(tokenizer, prompt, CacheSlot(0, 96))
        list(generate(PerSlotModels([m0]), gen))
        alone.append(gen.generated)
    engine = CountingBatch(PerSlotModels([m0, m1]))
    together = [_greedy(tokenizer, p, CacheSlot(i, 96)) for i, p in enumerate(prompts)]
    list(generate(engine, *together))
    assert [g.generated for g in together] == alone
    assert alone[0] != alone[1] and all(len(a) == 12 for a in alone)
    assert all(len(call) == 2 for call in engine.calls)      # every step: one call for both sequences


def test_mask_steers_greedy_decoding_of_the_real_model(smollm_parts):
    tokenizer, (model, _) = smollm_parts
    prompt = "The capital of France is"
    free = _greedy(tokenizer, prompt, CacheSlot(0, 96), max_tokens=3)
    list(generate(PerSlotModels([model]), free))
    first = free.generated[0]
    # reference: the engine's own logits after the prompt, best token once `first` is excluded
    model.reset()
    logits = model.forward(tokenizer.encode(prompt, add_bos=None, special=True)).astype(np.float64)
    logits[first] = -np.inf
    mask = Forbid(tokenizer.n_vocab, forbidden=[first])
    steered = _greedy(tokenizer, prompt, CacheSlot(0, 96), max_tokens=3, token_mask=mask)
    list(generate(PerSlotModels([model]), steered))
    assert steered.generated[0] == int(np.argmax(logits)) != first
    assert first not in steered.generated and mask.accepted == steered.generated
