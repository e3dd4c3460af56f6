"""Samplers: statistics against the softmax formula, truncation rules, llama.cpp penalty semantics, seeds."""
from __future__ import annotations

import numpy as np
import pytest

from llmrun.errors import LlmrunError
from llmrun.text.sampling import Sampler, SamplingParams, apply_penalties, draw, min_p, top_k, top_p

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)   # no truncation


def _draws(sampler, logits, n):
    counts = np.zeros(len(logits), dtype=np.int64)
    for _ in range(n):
        counts[sampler.sample(logits)] += 1
    return counts


def _chi2(counts, probs):
    n = counts.sum()
    exp = probs * n
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_frequencies_follow_softmax_at_temperature(temperature):
    logits = np.array([1.2, 0.3, -0.5, 2.0, 0.0, -1.5, 0.9, 1.1], dtype=np.float32)
    expected = np.exp(logits.astype(np.float64) / temperature)
    expected /= expected.sum()
    s = Sampler(SamplingParams(temperature=temperature, **OFF), seed=1234)
    counts = _draws(s, logits, 20000)
    # chi-square with 7 degrees of freedom: 24.3 is the 0.1% critical value
    assert _chi2(counts, expected) < 24.3
    assert np.abs(counts / counts.sum() - expected).max() < 0.015


@pytest.mark.parametrize("n", [6, 300, 49152, 50001])
def test_top_k_equals_a_full_stable_sort(n):
    """top_k's candidate bound and partition give exactly the first k of a full stable sort by logit
    (ties: lower id first), on rows with runs of related ids, many ties, masked (-inf) ids and a NaN."""
    rng = np.random.default_rng(n)
    rows = [rng.standard_normal(n).astype(np.float32),
            (np.sin(np.arange(n) / 500) * 3 + rng.standard_normal(n) * 0.1).astype(np.float32),   # id runs
            rng.integers(0, 4, n).astype(np.float32),                                             # ties
            np.where(np.arange(n) % 3 == 0, -np.inf, rng.standard_normal(n)).astype(np.float32),
            np.sort(rng.standard_normal(n)).astype(np.float32)]                                   # ascending
    for row in rows:
        for k in (1, 5, 40, 200):
            if k >= n:
                continue
            ids, vals = top_k(np.arange(n), row, k)
            want = np.argsort(-row, kind="stable")[:k]
            np.testing.assert_array_equal(ids, want)
            np.testing.assert_array_equal(vals, row[want])
    nan = rows[0].copy()
    nan[n // 2] = np.nan
    ids, _ = top_k(np.arange(n), nan, 3)   # what a full partition gives, as before the bound
    kth = np.partition(nan, n - 3)[n - 3]
    cand = np.flatnonzero(nan >= kth)
    np.testing.assert_array_equal(ids, cand[np.argsort(-nan[cand], kind="stable")][:3])


@pytest.mark.parametrize("n", [6, 300, 5000, 49152])
def test_sampler_draws_what_the_chain_of_steps_draws(n):
    """Sampler.sample (one kernel, kernels/token_draw.py) picks, for the same random number, the token that
    numpy's chain of the steps picks: top_k (a full stable sort's first k), top_p, min_p, draw; on rows with id
    runs, ties and masked ids, for every truncation setting. A NaN (a logits processor's) is a one-line error."""
    rng = np.random.default_rng(n + 1)
    rows = [(rng.standard_normal(n) * 3).astype(np.float32),
            (np.sin(np.arange(n) / 500) * 3 + rng.standard_normal(n) * 0.1).astype(np.float32),
            rng.integers(0, 4, n).astype(np.float32),
            np.where(np.arange(n) % 3 == 0, -np.inf, rng.standard_normal(n)).astype(np.float32),
            np.where(np.arange(n) == n // 2, 5.0, -np.inf).astype(np.float32),        # one token allowed
            (rng.standard_cauchy(n) * 4).astype(np.float32)]
    settings = [dict(top_k=k, top_p=p, min_p=m, temperature=t)
                for k in (0, 1, 40, 100, n) for p in (1.0, 0.95, 0.3) for m in (0.0, 0.05, 0.9)
                for t in (0.2, 1.3)]
    for i, row in enumerate(rows):
        for j, kw in enumerate(settings):
            params = SamplingParams(**kw)
            seed = 1000 * i + j
            got = [Sampler(params, seed=seed).sample(row)]
            chain = np.random.default_rng(seed)
            ids, vals = top_k(np.arange(n), row, params.top_k)
            ids, vals = top_p(ids, vals, params.top_p)
            ids, vals = min_p(ids, vals, params.min_p)
            assert got == [draw(ids, vals, params.temperature, chain)], (i, kw)
    sampler, chain = Sampler(SamplingParams(), seed=5), np.random.default_rng(5)   # one generator, many draws
    for _ in range(200):
        ids, vals = top_k(np.arange(n), rows[0], 40)
        ids, vals = min_p(*top_p(ids, vals, 0.95), 0.05)
        assert sampler.sample(rows[0]) == draw(ids, vals, 0.8, chain)
    for huge in (10 ** 30, -10 ** 30):   # beyond int64: the same as all tokens / off
        assert Sampler(SamplingParams(top_k=huge), seed=3).sample(rows[0]) == \
            Sampler(SamplingParams(top_k=0), seed=3).sample(rows[0])
    nan = rows[0].copy()
    nan[n // 3] = np.nan
    for temperature in (0.0, 0.8):
        with pytest.raises(LlmrunError, match="NaN"):
            Sampler(SamplingParams(temperature=temperature), seed=0).sample(nan)


def test_top_k_never_picks_excluded_and_renormalises():
    logits = np.array([0.5, 3.0, 2.5, -1.0, 2.0, 1.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0), seed=7)
    counts = _draws(s, logits, 12000)
    allowed = [1, 2, 4]
    assert counts[[0, 3, 5]].sum() == 0
    p = np.exp(logits[allowed].astype(np.float64))
    p /= p.sum()
    assert _chi2(counts[allowed], p) < 13.8  # df=2, 0.1%


def _logits_for(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


@pytest.mark.parametrize("top_p,allowed", [(0.45, {0}), (0.75, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_nucleus(top_p, allowed):
    logits = _logits_for([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0), seed=3)
    seen = set(np.nonzero(_draws(s, logits, 3000))[0].tolist())
    assert seen == allowed


@pytest.mark.parametrize("min_p,allowed", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0}), (0.0, {0, 1, 2, 3})])
def test_min_p_relative_to_best(min_p, allowed):
    logits = _logits_for([0.5, 0.3, 0.15, 0.05])  # thresholds: p >= min_p * 0.5
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p), seed=5)
    seen = set(np.nonzero(_draws(s, logits, 3000))[0].tolist())
    assert seen == allowed


def test_truncation_happens_before_temperature():
    # llama.cpp order: min-p decides on the untempered distribution, so a high temperature cannot revive
    # a token min-p removed.
    logits = _logits_for([0.6, 0.3, 0.1])
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.3), seed=11)
    counts = _draws(s, logits, 4000)
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0


def test_repeat_penalty_llama_cpp_semantics():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 1], repeat_penalty=2.0)
    # positive logits divided, negative multiplied; each distinct token once, however often it occurred
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_allclose(logits, [2.0, -2.0, 1.0, 0.5])  # input untouched


def test_frequency_and_presence_penalties():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 1], repeat_penalty=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    np.testing.assert_allclose(out, [2.0 - 0.5 - 0.25, -2.0 - 1.0 - 0.25, 1.0, 0.5])


def test_penalty_window_is_last_n():
    logits = np.array([2.0, 2.0, 2.0], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 2], repeat_penalty=2.0, last_n=1)
    np.testing.assert_allclose(out, [2.0, 2.0, 1.0])
    assert np.array_equal(apply_penalties(logits, [0, 1], repeat_penalty=2.0, last_n=0), logits)


def test_greedy_is_argmax_after_penalties():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    g = Sampler(SamplingParams(temperature=0.0), seed=0)
    assert g.sample(logits) == 1
    g2 = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), seed=0)
    assert g2.sample(logits, previous=[1]) == 2   # 3.0 / 1.5 = 2.0 < 2.9


def test_same_seed_same_tokens_other_seed_differs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = [Sampler(params, seed=42).sample(logits) for _ in range(1)]
    s1, s2, s3 = Sampler(params, seed=42), Sampler(params, seed=42), Sampler(params, seed=43)
    seq1 = [s1.sample(logits) for _ in range(50)]
    seq2 = [s2.sample(logits) for _ in range(50)]
    seq3 = [s3.sample(logits) for _ in range(50)]
    assert seq1 == seq2 and seq1[0] == a[0]
    assert seq1 != seq3


@pytest.mark.parametrize("kw", [dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0),
                                dict(temperature=float("nan"))])
def test_bad_parameters_are_one_line_errors(kw):
    with pytest.raises(LlmrunError):
        SamplingParams(**kw)


def test_parameters_become_plain_numbers_or_one_line_errors():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(7), top_p="0.9")
    assert (p.temperature, p.top_k, p.top_p) == (0.5, 7, 0.9)
    assert type(p.temperature) is float and type(p.top_k) is int and type(p.top_p) is float
    for kw in (dict(top_k="many"), dict(temperature=None), dict(repeat_last_n=float("inf"))):
        with pytest.raises(LlmrunError, match=next(iter(kw))):
            SamplingParams(**kw)
