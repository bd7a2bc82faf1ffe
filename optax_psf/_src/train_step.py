"""Compiled training steps that skip the second gradient the fast way per backend.

Two execution paths give the same trajectory:

- ``"in_graph"``: one compiled step; a ``jax.lax.cond`` inside it takes or
  skips the second gradient.
- ``"host"``: two compiled steps, one that always takes the second gradient
  and one that never does. The host reads the decisions of a whole window from
  the optimizer state (one device-to-host transfer per window) and calls the
  matching step.

XLA:CPU compiles the gradient of a convolution inside a conditional into a
slow generic loop (jax-ml/jax issue 12868), so ``"auto"`` picks ``"host"`` on
CPU and ``"in_graph"`` elsewhere.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_psf._src import metrics as metrics_lib
from optax_psf._src.transform import PsfReuseState

PATHS = ("auto", "in_graph", "host")

logger = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """Outputs of one training step.

    Attributes:
      params: The updated parameters.
      opt_state: The updated optimizer state.
      loss: The loss at the parameters before the update (clean forward pass).
      model_state: The updated model state, such as BatchNorm statistics, or
        ``None`` for a loss without one.
      metrics: :func:`optax_psf.metrics` of the new state, or an empty dict
        when the optimizer contains no vSAM or SAM transformation.
    """

    params: optax.Params
    opt_state: optax.OptState
    loss: jax.Array
    model_state: Any
    metrics: dict[str, jax.Array]


def default_path() -> str:
    """Returns the path ``"auto"`` resolves to on the default backend."""
    return "host" if jax.default_backend() == "cpu" else "in_graph"


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_model_state: bool = False,
    path: str = "auto",
    donate: bool = False,
) -> TrainStep:
    """Builds a compiled training step for ``tx``, using the fastest path.

    The step computes the loss and clean gradient, builds ``grad_fn`` from the
    same loss and batch, applies ``tx`` and returns the new parameters.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` or, with ``has_model_state``,
        ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``.
        For the second gradient the model state of the clean pass is used and
        the new one is dropped, so BatchNorm statistics follow only the clean
        forward passes.
      tx: An optax transformation, typically
        ``optax.chain(optax_psf.vsam(...), optimizer)``.
      has_model_state: Whether ``loss_fn`` takes and returns a model state.
      path: ``"in_graph"``, ``"host"`` or ``"auto"`` (``"host"`` on CPU,
        ``"in_graph"`` on other backends).
      donate: Whether to donate the parameters, optimizer state and model
        state to the step, so their buffers are reused. The arrays passed in
        must not be used afterwards.

    Returns:
      A :class:`TrainStep`, called as
      ``step(params, opt_state, batch, model_state=None) -> StepOutput``.

    Raises:
      ValueError: If ``path`` is not one of ``"auto"``, ``"in_graph"`` or
        ``"host"``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}.")
    return TrainStep(
        loss_fn, tx, has_model_state, default_path() if path == "auto" else path, donate
    )


class TrainStep:
    """A training step built by :func:`make_train_step`.

    Attributes:
      path: ``"in_graph"`` or ``"host"``, the path in use.
    """

    def __init__(self, loss_fn, tx, has_model_state: bool, path: str, donate: bool):
        self.path = path
        self._loss_fn = loss_fn
        self._tx = tx
        self._has_model_state = has_model_state
        donate_argnums = (0, 1, 3) if donate else ()

        def compile_step(planned_sample):
            step = functools.partial(self._step, planned_sample=planned_sample)
            return jax.jit(step, donate_argnums=donate_argnums)

        self._in_graph_step = compile_step(None)
        self._sample_step = compile_step(True)
        self._skip_step = compile_step(False)
        self._host_plan = HostPlan()
        self._last_opt_state: Any = None
        self._has_psf_state: bool | None = None

    @property
    def plan_reads(self) -> int:
        """Number of device-to-host reads of the plan so far (host path)."""
        return self._host_plan.reads

    def __call__(self, params, opt_state, batch, model_state=None) -> StepOutput:
        """Runs one training step; see :func:`make_train_step`."""
        if self._has_psf_state is None:
            # The state's structure is fixed by tx, so this is checked once.
            self._has_psf_state = _find_state_or_none(opt_state) is not None
        if self.path == "in_graph" or not self._has_psf_state:
            return self._in_graph_step(params, opt_state, batch, model_state)

        # Any state other than the one this step returned last (a restored
        # checkpoint, say) invalidates the cached plan.
        take_sample = self._host_plan.next(opt_state, same_run=opt_state is self._last_opt_state)
        step = self._sample_step if take_sample else self._skip_step
        output = step(params, opt_state, batch, model_state)
        self._last_opt_state = output.opt_state
        return output

    def compile(self, params, opt_state, batch, model_state=None) -> float:
        """Compiles the step ahead of time for arguments shaped like these.

        Runs each compiled program the path uses once, on copies of the
        arguments, so later calls with arguments of the same shapes and
        dtypes do not compile and nothing passed in is donated.

        Returns:
          The time spent, in seconds: compilation plus one step per program.
        """
        if self.path == "in_graph" or _find_state_or_none(opt_state) is None:
            programs = [self._in_graph_step]
        else:
            programs = [self._sample_step, self._skip_step]
        start = time.perf_counter()
        for program in programs:
            args = jax.tree.map(jnp.copy, (params, opt_state, batch, model_state))
            jax.block_until_ready(program(*args))
        return time.perf_counter() - start

    def reset(self) -> None:
        """Drops the cached plan, so that the next call reads it from the state."""
        self._host_plan.reset()
        self._last_opt_state = None

    def _step(self, params, opt_state, batch, model_state, *, planned_sample):
        if self._has_model_state:

            def clean_loss(p):
                return self._loss_fn(p, model_state, batch)

            (loss, new_model_state), grads = jax.value_and_grad(clean_loss, has_aux=True)(params)

            def grad_fn(perturbed_params, _):
                return jax.grad(lambda p: clean_loss(p)[0])(perturbed_params)

        else:
            loss, grads = jax.value_and_grad(self._loss_fn)(params, batch)
            new_model_state = None

            def grad_fn(perturbed_params, _):
                return jax.grad(self._loss_fn)(perturbed_params, batch)

        extra = {} if planned_sample is None else {"planned_sample": planned_sample}
        updates, opt_state = self._tx.update(grads, opt_state, params, grad_fn=grad_fn, **extra)
        params = optax.apply_updates(params, updates)
        psf_state = _find_state_or_none(opt_state)
        metrics = {} if psf_state is None else metrics_lib.metrics(psf_state)
        return StepOutput(params, opt_state, loss, new_model_state, metrics)


class HostPlan:
    """Reads the decisions planned in an optimizer state, once per window.

    For training loops that call ``tx.update`` themselves, such as a Flax NNX
    loop around ``nnx.Optimizer.update``: compile one step with
    ``planned_sample=True`` and one with ``False`` (both are passed on to
    ``tx.update``), and ask :meth:`next` which one to run before each step.

      >>> plan = optax_psf.HostPlan()  # doctest: +SKIP
      >>> take = plan.next(opt_state)  # doctest: +SKIP
      >>> step = sample_step if take else skip_step  # doctest: +SKIP

    Each call of :meth:`next` must be followed by one step that updates the
    state. Call :meth:`reset` after replacing the state (a restored
    checkpoint, say). :func:`make_train_step` does all of this itself.

    Attributes:
      reads: Number of device-to-host reads of the plan so far.
    """

    def __init__(self) -> None:
        self.reads = 0
        self._plan: Any = None
        self._index = 0
        self._count_at_read = 0
        self._index_at_read = 0

    def next(self, opt_state: optax.OptState, *, same_run: bool = True) -> bool:
        """Returns whether the next step takes the second gradient.

        Args:
          opt_state: The optimizer state the next step starts from. It is read
            only when the cached plan is used up or ``same_run`` is false.
          same_run: Whether ``opt_state`` came from the step after the previous
            call. ``False`` makes it read the plan again.
        """
        if not same_run or self._plan is None or self._index >= len(self._plan):
            self._read(metrics_lib.find_state(opt_state), same_run and self._plan is not None)
        decision = bool(self._plan[self._index])
        self._index += 1
        return decision

    def reset(self) -> None:
        """Drops the cached plan, so that the next call reads it from the state."""
        self._plan = None

    def _read(self, psf_state: PsfReuseState, continues: bool) -> None:
        plan, start, length, count = jax.device_get(
            (psf_state.plan, psf_state.plan_start, psf_state.plan_length, psf_state.count)
        )
        self.reads += 1
        expected = self._count_at_read + self._index - self._index_at_read
        if continues and int(count) != expected:
            # NOTE: a wrapper such as optax.apply_if_finite kept the old state
            # on some step, so the steps since the last read followed the plan
            # one or more steps ahead of the state. The in-graph path is exact.
            logger.warning(
                "The optimizer state did not advance on every step since the last plan"
                " read (count %d, expected %d); decisions in between may differ from"
                " path='in_graph'.",
                int(count),
                expected,
            )
        # The state always plans the step it is about to take, so count
        # lies in [start, start + length).
        self._plan = plan[: int(length)]
        self._index = int(count) - int(start)
        self._count_at_read = int(count)
        self._index_at_read = self._index


def _find_state_or_none(opt_state: Any) -> PsfReuseState | None:
    try:
        return metrics_lib.find_state(opt_state)
    except ValueError:
        return None
