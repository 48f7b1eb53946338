"""The Rust sampler (`mistralrs_serve._native.sample`) against a small numpy reference.

The reference below is the specification, written for reading rather than speed:

* processing, in this order: DRY, repetition penalty (prompt and output tokens), presence and
  frequency penalties (output tokens only), logit bias, then temperature (skipped when greedy);
* truncation of the processed logits: top-k, then top-p over what top-k left, then min-p
  (relative to the best remaining token); the draw is from the renormalised survivors;
* logprobs are the log-softmax of the processed logits (temperature 1 when greedy), before
  truncation.

Differential tests compare the two on seeded random logits; statistical tests compare sampling
frequencies to the reference distribution with fixed seeds, so nothing here is flaky.
Everything runs on the CPU in a few seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from mistralrs_serve import _native
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import SamplingParams as RequestParams

EMPTY = np.zeros(0, dtype=np.uint32)


def f32(value: float) -> float:
    """The native side stores parameters as f32; the reference uses the same values."""
    return float(np.float32(value))


@dataclasses.dataclass(frozen=True)
class Params:
    """The keywords of `_native.SamplingParams`, readable by the reference."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[int, ...] = ()
    seed: int = 0
    return_logprob: bool = False
    num_top_logprobs: int = 0

    def native(self) -> _native.SamplingParams:
        kwargs = dataclasses.asdict(self)
        kwargs["logit_bias"] = [tuple(pair) for pair in self.logit_bias]
        kwargs["dry_sequence_breakers"] = list(self.dry_sequence_breakers)
        return _native.SamplingParams(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------- reference


def dry_penalties(context: Sequence[int], p: Params) -> dict[int, float]:
    """Token -> DRY penalty. A token that followed an earlier occurrence of the context's last
    token would extend a repeat; the repeat's length is the longest suffix of the context that
    also ends at that occurrence. Sequence breakers end a match (contexts here are shorter than
    the native 512-token cap on a match)."""
    breakers = set(p.dry_sequence_breakers)
    if not context or context[-1] in breakers:
        return {}
    n = len(context)
    longest: dict[int, int] = {}
    for end in range(n - 1):
        follower = context[end + 1]
        if context[end] != context[-1] or follower in breakers:
            continue
        length = 1
        while (
            length <= end
            and context[end - length] == context[n - 1 - length]
            and context[n - 1 - length] not in breakers
        ):
            length += 1
        longest[follower] = max(longest.get(follower, 0), length)
    return {
        token: f32(p.dry_multiplier) * f32(p.dry_base) ** (length - p.dry_allowed_length)
        for token, length in longest.items()
        if length >= p.dry_allowed_length
    }


def process(row: np.ndarray, p: Params, prompt: Iterable[int], output: Iterable[int]) -> np.ndarray:
    """Penalties, bias and temperature applied to one row of logits (float64 copy)."""
    x = row.astype(np.float64)
    vocab = len(x)
    context = [*map(int, prompt), *map(int, output)]
    if p.dry_multiplier != 0.0:
        for token, penalty in dry_penalties(context, p).items():
            if token < vocab:
                x[token] -= penalty
    if p.repetition_penalty != 1.0:
        penalty = f32(p.repetition_penalty)
        for token in {t for t in context if t < vocab}:
            x[token] = x[token] / penalty if x[token] > 0 else x[token] * penalty
    for token, count in Counter(int(t) for t in output).items():
        if token < vocab:
            x[token] -= f32(p.frequency_penalty) * count + f32(p.presence_penalty)
    for token, bias in p.logit_bias:
        x[token] += f32(bias)
    if not p.greedy:
        x = x / f32(p.temperature)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    finite = x[np.isfinite(x)]
    top = finite.max()
    return x - (top + np.log(np.sum(np.exp(finite - top))))


def candidate_mask(x: np.ndarray, p: Params, slack: float = 0.0) -> np.ndarray:
    """Tokens left after top-k, top-p and min-p. `slack` > 0 loosens the top-p and min-p cuts
    (a superset of the exact set), `slack` < 0 tightens them (a subset)."""
    keep = np.isfinite(x)
    if 0 < p.top_k < keep.sum():
        kth_best = np.sort(x[keep])[::-1][p.top_k - 1]
        keep &= x >= kth_best  # ties at the k-th value all stay; the data here has none
    probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.concatenate(([0.0], np.cumsum(probs[order])[:-1]))
        keep[order[mass_before >= f32(p.top_p) + slack]] = False
    if p.min_p > 0.0:
        keep &= probs / probs[keep].max() >= f32(p.min_p) - slack
    return keep


def truncated_distribution(x: np.ndarray, p: Params) -> np.ndarray:
    """What a sampled row draws from: the survivors' probabilities, renormalised."""
    keep = candidate_mask(x, p)
    probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    return probs / probs.sum()


@dataclasses.dataclass
class Expected:
    processed: np.ndarray
    logprobs: np.ndarray
    greedy_token: int

    @functools.cached_property
    def most_likely(self) -> np.ndarray:
        """Token ids, most likely first (lower id first on ties)."""
        return np.argsort(-self.logprobs, kind="stable")


def reference(row: np.ndarray, p: Params, prompt: np.ndarray, output: np.ndarray) -> Expected:
    processed = process(row, p, prompt, output)
    return Expected(processed, log_softmax(processed), int(np.argmax(processed)))


def sample(
    logits: np.ndarray,
    params: Sequence[Params],
    prompts: Sequence[np.ndarray] | None = None,
    outputs: Sequence[np.ndarray] | None = None,
    steps: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = len(params)
    natives: dict[int, _native.SamplingParams] = {}  # one native object per distinct Params
    for p in params:
        if id(p) not in natives:
            natives[id(p)] = p.native()
    return _native.sample(
        logits,
        [natives[id(p)] for p in params],
        list(steps) if steps is not None else [0] * rows,
        prompt_ids=list(prompts) if prompts is not None else [EMPTY] * rows,
        output_ids=list(outputs) if outputs is not None else [EMPTY] * rows,
    )


# --------------------------------------------------------------------------- random cases


def random_history(rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output drawn from a few tokens, so that repeats (and DRY matches) happen."""
    alphabet = rng.choice(vocab, size=min(vocab, 6), replace=False)
    prompt = rng.choice(alphabet, size=int(rng.integers(0, 24))).astype(np.uint32)
    output = rng.choice(alphabet, size=int(rng.integers(0, 12))).astype(np.uint32)
    return prompt, output


def random_params(rng: np.random.Generator, vocab: int, greedy: bool) -> Params:
    pick = rng.choice
    bias_ids = rng.integers(0, vocab, size=2)
    return Params(
        temperature=0.0 if greedy else float(pick([0.5, 0.8, 1.0, 1.3])),
        top_k=int(pick([0, 1, 3, 50])),
        top_p=float(pick([1.0, 0.9, 0.5])),
        min_p=float(pick([0.0, 0.05, 0.3])),
        repetition_penalty=float(pick([1.0, 1.3, 0.8])),
        presence_penalty=float(pick([0.0, 0.5, -0.5])),
        frequency_penalty=float(pick([0.0, 0.3])),
        logit_bias=tuple((int(t), float(b)) for t, b in zip(bias_ids, rng.normal(0, 3, 2), strict=True))
        if rng.random() < 0.5
        else (),
        dry_multiplier=float(pick([0.0, 0.8])),
        dry_allowed_length=int(pick([1, 2, 3])),
        dry_sequence_breakers=tuple(int(t) for t in rng.integers(0, vocab, size=2)),
        seed=int(rng.integers(0, 2**63)),
        return_logprob=bool(rng.random() < 0.7),
        num_top_logprobs=int(pick([0, 1, 5])),
    )


def random_case(seed: int, vocab: int, rows: int, greedy: bool):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    params = [random_params(rng, vocab, greedy) for _ in range(rows)]
    prompts, outputs = zip(*(random_history(rng, vocab) for _ in range(rows)), strict=True)
    return logits, params, list(prompts), list(outputs)


def assert_logprobs_match(p: Params, exp: Expected, token: int, lp: float, top_ids, top_lps) -> None:
    """Logprob of the chosen token and the top-N list (most likely first), within 1e-5."""
    if p.return_logprob or p.num_top_logprobs > 0:
        assert lp == pytest.approx(exp.logprobs[token], abs=1e-5)
    else:
        assert np.isnan(lp)
    n = min(p.num_top_logprobs, len(exp.logprobs))
    want = exp.most_likely[:n]
    if n:
        gaps = -np.diff(exp.logprobs[want])
        assert (gaps > 1e-3).all(), "near tie in the test data: pick another seed"
    np.testing.assert_array_equal(top_ids[:n], want)
    np.testing.assert_allclose(top_lps[:n], exp.logprobs[want], rtol=0, atol=1e-5)
    # Rows asking for fewer than the widest row are padded with -1 / NaN.
    assert (top_ids[n:] == -1).all() and np.isnan(top_lps[n:]).all()


VOCABS = [1, 2, 7, 31, 1009, 49152]
BATCHES = [1, 9]  # 9 rows run on rayon's pool, 1 row on the calling thread


# --------------------------------------------------------------------------- differential


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", BATCHES)
def test_greedy_rows_match_the_reference(vocab: int, rows: int) -> None:
    logits, params, prompts, outputs = random_case(vocab * 10 + rows, vocab, rows, greedy=True)
    expected = [reference(logits[i], params[i], prompts[i], outputs[i]) for i in range(rows)]

    ids, lps, top_ids, top_lps = sample(logits, params, prompts, outputs, range(rows))

    assert ids.shape == (rows,) and ids.dtype == np.int64
    assert lps.shape == (rows,) and lps.dtype == np.float32
    width = max(min(p.num_top_logprobs, vocab) for p in params)
    assert top_ids.shape == top_lps.shape == (rows, width)
    for i, (p, exp) in enumerate(zip(params, expected, strict=True)):
        if vocab > 1:
            best, second = np.sort(exp.processed)[::-1][:2]
            assert best - second > 1e-3, "near tie in the test data: pick another seed"
        assert ids[i] == exp.greedy_token
        assert_logprobs_match(p, exp, int(ids[i]), float(lps[i]), top_ids[i], top_lps[i])
        # Greedy rows are left holding the processed logits (no temperature).
        np.testing.assert_allclose(logits[i], exp.processed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", BATCHES)
def test_sampled_tokens_stay_in_the_reference_candidates(vocab: int, rows: int) -> None:
    """Over many seeds, every sampled token is one the reference keeps after truncation, and the
    logprobs match. The candidates are loosened by 1e-6 of probability mass at the top-p and
    min-p cuts, for float rounding."""
    logits, params, prompts, outputs = random_case(vocab * 10 + rows + 5, vocab, rows, greedy=False)
    expected = [reference(logits[i], params[i], prompts[i], outputs[i]) for i in range(rows)]
    allowed = [candidate_mask(e.processed, p, slack=1e-6) for e, p in zip(expected, params, strict=True)]
    seen: list[set[int]] = [set() for _ in range(rows)]
    for seed in range(16 if vocab > 10_000 else 48):
        reseeded = [dataclasses.replace(p, seed=p.seed + seed) for p in params]
        ids, lps, top_ids, top_lps = sample(logits.copy(), reseeded, prompts, outputs, [3] * rows)
        for i in range(rows):
            token = int(ids[i])
            assert allowed[i][token], f"row {i}: token {token} was truncated away by the reference"
            seen[i].add(token)
            assert_logprobs_match(params[i], expected[i], token, float(lps[i]), top_ids[i], top_lps[i])
    # The draws are not stuck on one token where the reference leaves several likely ones.
    for i in range(rows):
        probs = truncated_distribution(expected[i].processed, params[i])
        if len(probs) > 1 and np.sort(probs)[-2] > 0.2:
            assert len(seen[i]) > 1, f"row {i}: {seen[i]} from {np.flatnonzero(probs).tolist()}"


def test_top_k_equal_to_one_and_min_p_one_are_greedy() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((1, 500)).astype(np.float32)
    best = int(np.argmax(logits))
    for params in (Params(top_k=1, temperature=1.7), Params(min_p=1.0), Params(top_p=1e-6)):
        for seed in range(20):
            ids, *_ = sample(logits.copy(), [dataclasses.replace(params, seed=seed)])
            assert ids[0] == best, params


def test_tiny_temperatures_sample_the_best_token() -> None:
    """1 / 1e-40 overflows f32; the sampler must not turn the best logit into inf - inf = NaN."""
    logits = np.array([[0.0, 2.0, 1.0, -3.0]], dtype=np.float32)
    for temperature in (1e-40, 1e-37, 1e-20, 1e-4):
        params = Params(temperature=temperature, return_logprob=True, seed=1)
        ids, lps, *_ = sample(logits.copy(), [params])
        assert ids[0] == 1 and lps[0] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- statistics

STAT_LOGITS = np.log(
    np.array([0.2, 0.16, 0.13, 0.11, 0.09, 0.075, 0.06, 0.05, 0.045, 0.035, 0.025, 0.02])
).astype(np.float32)


@pytest.mark.parametrize(
    "params",
    [
        Params(temperature=0.7),
        Params(temperature=1.5, top_k=5),
        Params(top_p=0.8),
        Params(temperature=0.8, top_p=0.9, min_p=0.05),
        Params(temperature=1.3, top_k=8, top_p=0.95, min_p=0.1),
        Params(min_p=0.33),
        Params(temperature=2.0, top_k=10, min_p=0.2),
    ],
    ids=lambda p: ",".join(
        f"{f.name}={getattr(p, f.name)}" for f in dataclasses.fields(p) if getattr(p, f.name) != f.default
    ),
)
def test_sampling_frequencies_follow_the_truncated_distribution(params: Params) -> None:
    n = 20_000
    x = process(STAT_LOGITS, params, [], [])
    # No token sits within 1e-3 of a cut, so float rounding cannot move the candidate set.
    np.testing.assert_array_equal(candidate_mask(x, params, 1e-3), candidate_mask(x, params, -1e-3))
    probs = truncated_distribution(x, params)

    params = dataclasses.replace(params, seed=12345)
    logits = np.tile(STAT_LOGITS, (n, 1))
    ids, *_ = sample(logits, [params] * n, steps=range(n))
    assert_frequencies(ids, probs)


def test_draws_are_independent_across_seeds_at_one_step() -> None:
    """Many requests with consecutive seeds at the same step draw like one request over steps."""
    n = 10_000
    params = Params(temperature=0.9, top_p=0.97)
    probs = truncated_distribution(process(STAT_LOGITS, params, [], []), params)
    logits = np.tile(STAT_LOGITS, (n, 1))
    ids, *_ = sample(logits, [dataclasses.replace(params, seed=s) for s in range(n)], steps=[7] * n)
    assert_frequencies(ids, probs)


def assert_frequencies(ids: np.ndarray, probs: np.ndarray) -> None:
    """Each count within 6 binomial standard deviations of n * p (deterministic: fixed seeds),
    the chi-square statistic within 6 of its standard deviations, and truncated tokens never."""
    n = len(ids)
    counts = np.bincount(ids, minlength=len(probs))
    assert (counts[probs == 0] == 0).all(), f"truncated tokens were drawn: {counts}"
    live = probs > 0
    expected = n * probs[live]
    sd = np.sqrt(expected * (1 - probs[live]))
    assert (np.abs(counts[live] - expected) <= 6 * sd + 1).all(), f"{counts[live]} vs {expected.round()}"
    df = live.sum() - 1
    if df > 0:
        chi2 = float(np.sum((counts[live] - expected) ** 2 / expected))
        assert chi2 < df + 6 * np.sqrt(2 * df), f"chi-square {chi2:.1f} with {df} degrees of freedom"


# --------------------------------------------------------------------------- seeds


def test_same_seed_and_step_give_the_same_token_in_any_batch() -> None:
    rng = np.random.default_rng(11)
    vocab = 1009
    row = rng.standard_normal(vocab).astype(np.float32)
    mine = Params(temperature=1.2, top_p=0.95, seed=2024)
    for step in (0, 1, 17, 2**40):
        (alone,), *_ = sample(row[None].copy(), [mine], steps=[step])
        for position in (0, 4, 8):
            others = rng.standard_normal((9, vocab)).astype(np.float32)
            others[position] = row
            params = [Params(seed=int(s), top_k=5) for s in rng.integers(0, 2**63, 9)]
            params[position] = mine
            steps = [int(s) for s in rng.integers(0, 100, 9)]
            steps[position] = step
            ids, *_ = sample(others, params, steps=steps)
            assert ids[position] == alone, (step, position)


def test_different_seeds_and_steps_draw_differently() -> None:
    vocab = 1009
    row = np.random.default_rng(5).standard_normal(vocab).astype(np.float32)

    def run(seed: int) -> list[int]:
        logits = np.tile(row, (32, 1))
        ids, *_ = sample(logits, [Params(seed=seed)] * 32, steps=range(32))
        return ids.tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len(set(run(1))) > 16  # the steps of one seed are not one draw repeated
    assert run(0) != run(2**64 - 1)


# --------------------------------------------------------------------------- penalties


def greedy_processed(
    row: Sequence[float] | np.ndarray, params: Params, prompt: Any = (), output: Any = ()
) -> np.ndarray:
    """Run one greedy row and return what it left in place: the processed logits."""
    logits = np.array([row], dtype=np.float32)
    sample(logits, [params], [np.array(prompt, np.uint32)], [np.array(output, np.uint32)])
    return logits[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_once_per_token() -> None:
    got = greedy_processed(
        [2.0, -2.0, 2.0, 0.5], Params(temperature=0, repetition_penalty=2.0), prompt=[0, 0], output=[1, 1]
    )
    np.testing.assert_array_equal(got, [1.0, -4.0, 2.0, 0.5])


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    params = Params(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    got = greedy_processed([0.0] * 4, params, prompt=[3, 3], output=[1, 1, 2])
    np.testing.assert_array_equal(got, [0.0, -1.0, -0.75, 0.0])


def test_logit_bias_adds_and_can_force_a_token() -> None:
    params = Params(temperature=0, logit_bias=((2, 100.0), (0, -1.5)))
    got = greedy_processed([0.0, 1.0, 0.0], params)
    np.testing.assert_array_equal(got, [-1.5, 1.0, 100.0])
    logits = np.zeros((1, 3), np.float32)
    for seed in range(10):
        ids, *_ = sample(logits.copy(), [Params(seed=seed, logit_bias=((1, 100.0),))])
        assert ids[0] == 1


def test_history_ids_outside_the_vocabulary_are_ignored() -> None:
    params = Params(temperature=0, repetition_penalty=2.0, presence_penalty=1.0, dry_multiplier=1.0)
    got = greedy_processed([1.0, 1.0], params, prompt=[7, 1, 7], output=[1, 7, 9])
    np.testing.assert_allclose(got, process(np.array([1.0, 1.0], np.float32), params, [7, 1, 7], [1, 7, 9]))
    assert got[0] == 1.0 and got[1] < 1.0


def dry(**kwargs: Any) -> Params:
    return Params(temperature=0, dry_multiplier=1.0, dry_base=2.0, **kwargs)


def test_dry_penalises_the_token_that_would_continue_a_repeat() -> None:
    # 1 2 3 4 9 1 2 3 -> 4 would repeat a run of 3 (allowed 2): penalty 1 * 2^(3 - 2).
    got = greedy_processed([0.0] * 10, dry(dry_allowed_length=2), prompt=[1, 2, 3, 4, 9, 1, 2, 3])
    expected = np.zeros(10)
    expected[4] = -2.0
    np.testing.assert_array_equal(got, expected)


def test_dry_allows_short_repeats() -> None:
    got = greedy_processed([0.0] * 10, dry(dry_allowed_length=2), prompt=[5, 6, 7, 5])
    assert (got == 0).all()
    got = greedy_processed([0.0] * 10, dry(dry_allowed_length=1), prompt=[5, 6, 7, 5])
    assert got[6] == -1.0 and (np.delete(got, 6) == 0).all()


def test_dry_sequence_breakers_end_matches() -> None:
    context = [1, 2, 3, 4, 1, 2, 3]
    # A breaker inside the suffix shortens the match to the tokens after it.
    got = greedy_processed([0.0] * 6, dry(dry_allowed_length=1, dry_sequence_breakers=(2,)), context)
    assert got[4] == -1.0  # match "3" only: 2^(1 - 1)
    # The last token a breaker, or the token that would follow one: no penalty at all.
    for breaker in (3, 4):
        got = greedy_processed(
            [0.0] * 6, dry(dry_allowed_length=1, dry_sequence_breakers=(breaker,)), context
        )
        assert (got == 0).all(), breaker


def test_dry_joins_prompt_and_output_and_takes_the_longest_match() -> None:
    whole = [1, 2, 3, 4, 7, 2, 3, 5, 1, 2, 3]
    params = dry(dry_allowed_length=1)
    for cut in range(len(whole) + 1):
        got = greedy_processed([0.0] * 8, params, prompt=whole[:cut], output=whole[cut:])
        # 4 continues "1 2 3" (length 3), 5 continues "2 3" (length 2).
        assert got[4] == -4.0 and got[5] == -2.0, cut


def test_dry_matches_the_reference_on_random_contexts() -> None:
    rng = np.random.default_rng(99)
    for _ in range(200):
        vocab = 8
        context = rng.integers(0, 4, size=int(rng.integers(0, 40))).astype(np.uint32)
        cut = int(rng.integers(0, len(context) + 1))
        params = dry(
            dry_allowed_length=int(rng.integers(1, 4)),
            dry_sequence_breakers=tuple(int(t) for t in rng.choice(5, size=int(rng.integers(0, 2)))),
        )
        params = dataclasses.replace(params, dry_base=1.5, dry_multiplier=0.7)
        row = np.zeros(vocab, np.float32)
        got = greedy_processed(row, params, prompt=context[:cut], output=context[cut:])
        want = process(row, params, context[:cut], context[cut:])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"context {context.tolist()}")


# --------------------------------------------------------------------------- in place


def test_logits_are_modified_in_place() -> None:
    """The contract: `sample` consumes the logits buffer. It writes the processed logits into the
    caller's array (no copy is made, so a view writes through to its base): greedy rows hold the
    logits after penalties and bias, sampled rows with a temperature also divided by it (up to a
    per-row constant). A caller who needs the raw logits afterwards must copy them first."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal((6, 50)).astype(np.float32)
    raw = base.copy()
    view = base[1:4]  # C-contiguous rows of a larger array
    params = [
        Params(temperature=0.0, repetition_penalty=1.5),
        Params(temperature=0.5, seed=4),
        Params(temperature=1.0, presence_penalty=1.0, logit_bias=((3, 2.0),)),
    ]
    history = np.array([1, 2, 3], np.uint32)
    sample(view, params, [history] * 3, [history] * 3)
    np.testing.assert_array_equal(base[[0, 4, 5]], raw[[0, 4, 5]])  # rows outside the view untouched
    for i, p in enumerate(params):
        want = process(raw[1 + i], p, history, history)
        shift = base[1 + i] - want
        np.testing.assert_allclose(shift, shift[0], atol=1e-5)
        assert not np.array_equal(base[1 + i], raw[1 + i])


def test_histories_are_read_from_the_scheduler() -> None:
    """The engine's form: each row's prompt and generated ids are the scheduler's, read where
    they live; the draws, logprobs and processed logits are those of the same ids as arrays."""
    logits, params, prompts, outputs = random_case(77, 1009, 9, greedy=False)
    scheduler = _native.Scheduler(num_blocks=64, block_size=4)
    seq_ids = [i for i, prompt in enumerate(prompts) if len(prompt)]  # a scheduled prompt is never empty
    for i in seq_ids:
        scheduler.add(i, prompts[i])
        for token in outputs[i].tolist():
            scheduler.append_token(i, token)
    steps = [len(outputs[i]) for i in seq_ids]
    rows = logits[seq_ids]
    by_arrays = rows.copy()
    chosen = [params[i] for i in seq_ids]
    want = sample(by_arrays, chosen, [prompts[i] for i in seq_ids], [outputs[i] for i in seq_ids], steps)
    by_scheduler = rows.copy()
    got = _native.sample(by_scheduler, [params[i].native() for i in seq_ids], steps, scheduler, seq_ids)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(by_arrays, by_scheduler)
    for i in seq_ids:
        prompt, output = scheduler.history(i)
        np.testing.assert_array_equal(prompt, prompts[i])
        np.testing.assert_array_equal(output, outputs[i])


# --------------------------------------------------------------------------- bad input


def bad_calls(native):
    """(label, call, exception type, message pattern) for each bad input. Self-contained (it
    imports only numpy): the crash test below runs it in a child interpreter."""
    import numpy as np

    empty = np.zeros(0, np.uint32)
    ok = native.SamplingParams()

    def run(logits, params=None, prompts=None, outputs=None, steps=None):
        rows = len(logits) if hasattr(logits, "__len__") else 1
        return lambda: native.sample(
            logits,
            params if params is not None else [ok] * rows,
            steps if steps is not None else [0] * rows,
            prompt_ids=prompts if prompts is not None else [empty] * rows,
            output_ids=outputs if outputs is not None else [empty] * rows,
        )

    def from_scheduler(seq_ids, *, prompts=None):
        scheduler = native.Scheduler(num_blocks=4)
        scheduler.add(7, np.arange(3, dtype=np.uint32))
        history = {} if prompts is None else {"prompt_ids": prompts, "output_ids": prompts}
        return lambda: native.sample(good.copy(), [ok] * 2, [0, 0], scheduler, seq_ids, **history)

    def new(*args, **kwargs):
        return lambda: native.SamplingParams(*args, **kwargs)

    good = np.zeros((2, 5), np.float32)
    readonly = good.copy()
    readonly.flags.writeable = False
    ids = np.arange(4, dtype=np.uint32)
    return [
        ("float64 logits", run(good.astype(np.float64)), ValueError, "float32.*got a float64 array"),
        ("1-D logits", run(np.zeros(5, np.float32)), ValueError, r"2-D .*shape \(5,\)"),
        ("strided logits", run(np.zeros((2, 10), np.float32)[:, ::2]), ValueError, "C-contiguous"),
        (
            "Fortran-order logits",
            run(np.asfortranarray(np.ones((2, 5), np.float32))),
            ValueError,
            "C-contiguous",
        ),
        ("read-only logits", run(readonly), ValueError, "writeable"),
        ("list logits", run([[0.0] * 5] * 2), TypeError, "float32 array, got a list"),
        ("too few params", run(good.copy(), params=[ok]), ValueError, "expected 1 rows x 5 vocab"),
        ("too few steps", run(good.copy(), steps=[0]), ValueError, "2 rows of params, 2 histories, 1 steps"),
        ("too few outputs", run(good.copy(), outputs=[empty]), ValueError, "differ in length"),
        ("too few histories", run(good.copy(), prompts=[empty], outputs=[empty]), ValueError, "1 histories"),
        (
            "int64 history",
            run(good.copy(), prompts=[empty, ids.astype(np.int64)]),
            ValueError,
            r"prompt_ids\[1\] must be a contiguous 1-D uint32 array, got a int64",
        ),
        ("strided history", run(good.copy(), outputs=[ids[::2], empty]), ValueError, r"output_ids\[0\]"),
        ("negative step", run(good.copy(), steps=[0, -1]), OverflowError, "negative"),
        ("unknown sequence", from_scheduler([7, 8]), KeyError, "sequence 8 is unknown"),
        ("two histories", from_scheduler([7, 7], prompts=[empty] * 2), ValueError, "or as prompt_ids"),
        ("no seq_ids", from_scheduler(None), ValueError, "scheduler and seq_ids"),
        ("not params", run(good.copy(), params=[ok, 3]), TypeError, "SamplingParams"),
        (
            "bias id out of range",
            run(good.copy(), params=[native.SamplingParams(logit_bias=[(5, 1.0)])] * 2),
            ValueError,
            "token id 5 is out of range for a vocabulary of 5",
        ),
        ("empty vocabulary", run(np.zeros((1, 0), np.float32)), ValueError, "0 vocab"),
        (
            "all -inf, greedy",
            run(np.full((1, 5), -np.inf, np.float32), [native.SamplingParams(temperature=0)]),
            RuntimeError,
            "no token can be sampled",
        ),
        ("all -inf, sampled", run(np.full((9, 5), -np.inf, np.float32)), RuntimeError, "no token"),
        ("all NaN", run(np.full((1, 5), np.nan, np.float32)), RuntimeError, "no token"),
        ("temperature < 0", new(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
        ("temperature NaN", new(temperature=float("nan")), ValueError, "temperature"),
        ("top_p 0", new(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        ("top_p > 1", new(top_p=1.01), ValueError, "top_p"),
        ("top_p NaN", new(top_p=float("nan")), ValueError, "top_p"),
        ("min_p NaN", new(min_p=float("nan")), ValueError, "min_p"),
        ("min_p > 1", new(min_p=1.5), ValueError, "min_p"),
        ("repetition_penalty 0", new(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        ("presence_penalty inf", new(presence_penalty=float("inf")), ValueError, "presence_penalty"),
        ("logit_bias NaN", new(logit_bias=[(0, float("nan"))]), ValueError, "logit_bias"),
        ("dry_base < 1", new(dry_multiplier=1.0, dry_base=0.5), ValueError, "dry_base"),
        ("dry_multiplier NaN", new(dry_multiplier=float("nan")), ValueError, "dry_multiplier"),
        ("negative top_k", new(top_k=-1), OverflowError, "negative"),
        ("positional params", new(0.5), TypeError, "positional"),
    ]


BAD_CALLS = bad_calls(_native)


@pytest.mark.parametrize(("label", "call", "error", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_python_error(label: str, call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()
    # The interpreter and the extension carry on.
    ids, *_ = sample(np.array([[0.0, 1.0]], np.float32), [Params(temperature=0)])
    assert ids[0] == 1


def test_bad_inputs_do_not_crash_a_fresh_interpreter() -> None:
    """A Rust panic or a segfault would end the child without its report."""
    script = "\n".join(
        [
            "import importlib.util, re",
            f"spec = importlib.util.spec_from_file_location('mistralrs_serve._native', {_native.__file__!r})",
            "native = importlib.util.module_from_spec(spec)",
            "spec.loader.exec_module(native)",
            textwrap.dedent(inspect.getsource(bad_calls)),
            "calls = bad_calls(native)",
            "for label, call, error, message in calls:",
            "    try:",
            "        call()",
            "    except error as exc:",
            "        assert re.search(message, str(exc)), (label, exc)",
            "    else:",
            "        raise SystemExit(f'{label}: no {error.__name__}')",
            "print('survived', len(calls))",
        ]
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == f"survived {len(BAD_CALLS)}"


# --------------------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("min_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 11.0),
        ("repetition_penalty", float("nan")),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("-inf")),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", float("nan")),
        ("logit_bias", {3: 101.0}),
        ("logit_bias", {3: float("nan")}),
        ("dry_multiplier", -1.0),
        ("dry_multiplier", float("nan")),
        ("dry_base", 0.5),
        ("dry_base", float("nan")),
        ("dry_allowed_length", 0),
        ("seed", -1),
        ("seed", 2**64),
        ("stop", ("",)),
        ("stop", tuple(str(i) for i in range(17))),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("n", 0),
        ("n", 129),
    ],
)
def test_request_params_name_the_invalid_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        RequestParams(**{field: value})
    assert excinfo.value.param == field
    assert field in str(excinfo.value)


@pytest.mark.parametrize("field", ["dry_multiplier", "dry_base"])
def test_request_params_reject_infinite_dry_values(field: str) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        kwargs: dict[str, Any] = {"dry_multiplier": 1.0, field: float("inf")}
        RequestParams(**kwargs)
    assert excinfo.value.param == field


def test_logit_bias_outside_the_vocabulary_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        RequestParams(logit_bias={10: 1.0}).check_vocab(10)
    assert excinfo.value.param == "logit_bias"
    assert "10" in str(excinfo.value)


def test_request_params_convert_to_native() -> None:
    def encode(text: str) -> list[int]:
        return {"\n": [5], ":": [6, 5]}.get(text, [])

    params = RequestParams(
        temperature=0.3,
        top_k=-1,
        seed=2**64 - 1,
        logprobs=True,
        top_logprobs=4,
        dry_sequence_breakers=("\n", ":"),
    )
    native = params.to_native(encode=encode, choice_index=2)
    assert native.temperature == pytest.approx(0.3)
    assert native.seed == 1  # seed + choice index, wrapped to 64 bits
    assert native.num_top_logprobs == 4
    assert RequestParams(top_logprobs=4).to_native(encode).num_top_logprobs == 0  # logprobs off
    unseeded = {RequestParams().to_native(encode).seed for _ in range(4)}
    assert len(unseeded) > 1  # no seed: a fresh random one per request
    logits = np.zeros((1, 100), np.float32)
    ids, *_ = _native.sample(logits, [native], [0], prompt_ids=[EMPTY], output_ids=[EMPTY])
    assert 0 <= ids[0] < 100
