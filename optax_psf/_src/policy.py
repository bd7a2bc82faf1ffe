"""Sampling policies: on which steps the second gradient is computed.

A policy is a pure function of its own small state, the PSF statistics and one
uniform draw ``u`` in ``[0, 1)``. The transformation draws ``u`` from the PRNG
key in its state; taking ``u`` as an argument lets tests replay recorded draws.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_psf._src import statistics as stats_lib


class SamplingPolicy(NamedTuple):
    """Decides, step by step, whether to take the second gradient.

    Attributes:
      init: ``init() -> policy_state``.
      decide: ``decide(policy_state, statistics, u) -> (sample, policy_state)``
        where ``statistics`` is a :class:`PsfStatistics`, ``u`` a float32
        uniform draw in ``[0, 1)`` and ``sample`` a boolean scalar.
      target_rate: ``target_rate(policy_state) -> rate``, the fraction of steps
        the policy currently aims to sample, for logging.
      reads_statistics: ``reads_statistics(policy_state) -> bool``, whether
        the next call of ``decide`` reads the statistics. Decisions between two
        such calls depend only on the policy state and the draws, which lets
        :func:`plan_decisions` compute them ahead of time.
      static_decision: ``True`` or ``False`` when the decision never depends
        on the state, which lets the transformation skip the conditional.
        ``None`` otherwise.
    """

    init: Callable[[], Any]
    decide: Callable[[Any, stats_lib.PsfStatistics, jax.Array], tuple[jax.Array, Any]]
    target_rate: Callable[[Any], jax.Array]
    reads_statistics: Callable[[Any], jax.Array]
    static_decision: bool | None = None


def always_sample() -> SamplingPolicy:
    """Builds the policy of plain SAM: every step takes the second gradient."""
    return SamplingPolicy(
        init=optax.EmptyState,
        decide=lambda state, statistics, u: (jnp.array(True), state),
        target_rate=lambda state: jnp.ones((), jnp.float32),
        reads_statistics=lambda state: jnp.array(False),
        static_decision=True,
    )


def never_sample() -> SamplingPolicy:
    """Builds a policy that never takes the second gradient (plain descent)."""
    return SamplingPolicy(
        init=optax.EmptyState,
        decide=lambda state, statistics, u: (jnp.array(False), state),
        target_rate=lambda state: jnp.zeros((), jnp.float32),
        reads_statistics=lambda state: jnp.array(False),
        static_decision=False,
    )


class VSamPolicyState(NamedTuple):
    """State of vSAM's sampling controller.

    Attributes:
      step: Steps seen, warm-up included. shape=(), dtype=int32.
      window_step: Position counter ``n`` after warm-up. It starts at 1, and a
        window begins whenever ``n % window == 0``. shape=(), dtype=int32.
      window_samples: Samples taken in the current window, ``c``. shape=(),
        dtype=int32.
      rate: Target number of samples per window, ``r``. Starts at 1.
        shape=(), dtype=float32.
      probability: Per-step sampling probability ``p = r / window``, 0.5
        before the first window update. shape=(), dtype=float32.
    """

    step: jax.Array
    window_step: jax.Array
    window_samples: jax.Array
    rate: jax.Array
    probability: jax.Array


def vsam_policy(
    window: int = 50,
    *,
    max_rate: float = 0.8,
    alpha: tuple[float, float] = (0.13, 0.13),
    warmup_steps: int | None = None,
) -> SamplingPolicy:
    """Builds vSAM's adaptive controller of the sampling rate.

    During warm-up every step samples. Afterwards, at the start of each window
    of ``window`` steps, the target number of samples per window ``r`` is
    scaled by ``1 + alpha[0] * d_ratio + alpha[1] * d_variance``. Here
    ``d_ratio`` and ``d_variance`` are the mean relative changes, clipped to
    ``[-1, 1]``, of the ``||psf|| / ||g||`` history and of the PSF-norm
    variance history. ``r`` is then clipped to ``[1, floor(window * max_rate)]``.
    A step samples when the window still owes samples and
    ``u >= 1 - r / window``, or when the steps left in the window are only
    just enough for the samples it still owes.

    Args:
      window: Steps per window, ``K``; also the length of the statistics'
        histories, which must be built with the same value.
      max_rate: Largest fraction of a window's steps that may sample, in
        ``(0, 1]``.
      alpha: ``(alpha_ratio, alpha_variance)``: sensitivity of the rate to the
        relative change of the ratio history and of the variance history.
      warmup_steps: Steps at the start of training that all sample. ``None``
        means ``window``, so that the histories are full when the first
        window starts.

    Returns:
      A :class:`SamplingPolicy` whose state is a :class:`VSamPolicyState`.

    Raises:
      ValueError: If a hyperparameter is outside its valid range.

    References:
      Deng et al., `Effective Gradient Sample Size via Variation Estimation
      for Accelerating Sharpness aware Minimization
      <https://arxiv.org/abs/2403.08821>`_, 2024
    """
    check_window(window)
    check_max_rate(max_rate, window)
    alpha_ratio, alpha_variance = check_alpha(alpha)
    warmup_steps = window if warmup_steps is None else warmup_steps
    check_warmup_steps(warmup_steps)
    max_samples = math.floor(window * max_rate)

    def init():
        return VSamPolicyState(
            step=jnp.zeros((), jnp.int32),
            window_step=jnp.ones((), jnp.int32),
            window_samples=jnp.zeros((), jnp.int32),
            rate=jnp.ones((), jnp.float32),
            probability=jnp.full((), 0.5, jnp.float32),
        )

    def warmup_decide(state):
        # The reference leaves the window's sample count at 1 during warm-up
        # and does not advance the window counter.
        return jnp.array(True), state._replace(
            step=state.step + 1, window_samples=jnp.ones((), jnp.int32)
        )

    def adaptive_decide(state, statistics, u):
        position = state.window_step % window
        window_starts = position == 0

        d_ratio = jnp.clip(stats_lib.mean_relative_change(statistics.ratios), -1, 1)
        d_variance = jnp.clip(stats_lib.mean_relative_change(statistics.variances), -1, 1)
        scaled_rate = state.rate * (1 + alpha_ratio * d_ratio + alpha_variance * d_variance)
        scaled_rate = jnp.clip(scaled_rate, 1.0, max_samples)
        rate = jnp.where(window_starts, scaled_rate, state.rate)
        probability = jnp.where(window_starts, rate / window, state.probability)
        samples_taken = jnp.where(window_starts, 0, state.window_samples)

        owed = jnp.floor(rate).astype(jnp.int32) - samples_taken
        random_pick = (owed > 0) & (u >= 1 - probability)
        forced_pick = window - position <= owed
        sample = random_pick | forced_pick

        return sample, VSamPolicyState(
            step=state.step + 1,
            window_step=state.window_step + 1,
            window_samples=samples_taken + sample.astype(jnp.int32),
            rate=rate,
            probability=probability,
        )

    def decide(state, statistics, u):
        in_warmup = state.step < warmup_steps
        warm_sample, warm_state = warmup_decide(state)
        sample, next_state = adaptive_decide(state, statistics, u)
        sample = jnp.where(in_warmup, warm_sample, sample)
        next_state = jax.tree.map(lambda w, a: jnp.where(in_warmup, w, a), warm_state, next_state)
        return sample, next_state

    def target_rate(state):
        return state.rate / window

    def reads_statistics(state):
        return (state.step >= warmup_steps) & (state.window_step % window == 0)

    return SamplingPolicy(
        init=init, decide=decide, target_rate=target_rate, reads_statistics=reads_statistics
    )


def split_draw(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the next key and the step's uniform draw in ``[0, 1)`` from ``key``."""
    key, draw_key = jax.random.split(key)
    return key, jax.random.uniform(draw_key)


def plan_decisions(
    policy: SamplingPolicy,
    policy_state: Any,
    statistics: stats_lib.PsfStatistics,
    key: jax.Array,
    size: int,
) -> tuple[jax.Array, jax.Array]:
    """Computes the decisions of the next steps, up to the next statistics read.

    Runs ``decide`` ahead on the same draws that the steps will take from
    ``key``, so the first ``length`` entries are exactly the decisions those
    steps will make.

    Args:
      policy: The sampling policy.
      policy_state: Its state before the first planned step.
      statistics: The statistics before the first planned step.
      key: The PRNG key before the first planned step.
      size: Number of steps to simulate.

    Returns:
      ``(decisions, length)``: a bool array of shape ``(size,)`` and the number
      of its leading entries that are final, at least 1. Later entries depend
      on statistics not yet recorded.
    """
    if policy.static_decision is not None:
        return jnp.full((size,), policy.static_decision), jnp.asarray(size, jnp.int32)

    def step(carry, _):
        policy_state, key = carry
        reads = policy.reads_statistics(policy_state)
        key, u = split_draw(key)
        sample, policy_state = policy.decide(policy_state, statistics, u)
        return (policy_state, key), (sample, reads)

    _, (decisions, reads) = jax.lax.scan(step, (policy_state, key), None, length=size)
    # The first step may read the statistics: they are current. A later read
    # needs statistics that the planned steps have yet to record.
    later_reads = reads.at[0].set(False)
    length = jnp.where(jnp.any(later_reads), jnp.argmax(later_reads), size)
    return decisions, length.astype(jnp.int32)


def check_window(window: int) -> None:
    """Raises if ``window`` is not an integer of at least 2."""
    if not _is_int(window):
        raise TypeError(f"window must be an int >= 2, got {window!r}.")
    if window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}.")


def check_max_rate(max_rate: float, window: int) -> None:
    """Raises if ``max_rate`` is outside ``(0, 1]`` or allows no sample per window."""
    if not _is_real(max_rate) or not 0 < max_rate <= 1:
        raise ValueError(f"max_rate must be a number in (0, 1], got {max_rate!r}.")
    if math.floor(window * max_rate) < 1:
        raise ValueError(
            f"max_rate={max_rate!r} with window={window!r} allows no sample per"
            f" window: window * max_rate must be at least 1."
        )


def check_alpha(alpha: tuple[float, float]) -> tuple[float, float]:
    """Returns ``alpha`` as two floats; raises unless it is a pair of finite numbers."""
    message = (
        f"alpha must be a pair of finite numbers (alpha_ratio, alpha_variance), got {alpha!r}."
    )
    try:
        values = tuple(alpha)
    except TypeError:
        raise ValueError(message) from None
    if len(values) != 2 or not all(_is_real(v) and math.isfinite(v) for v in values):
        raise ValueError(message)
    return float(values[0]), float(values[1])


def check_warmup_steps(warmup_steps: int) -> None:
    """Raises if ``warmup_steps`` is not a non-negative integer."""
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(
            f"warmup_steps must be an int >= 0 (or None for one window), got {warmup_steps!r}."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
