"""The transformation that wires a policy, a perturbation and a reuse rule."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_psf._src import perturbation as perturbation_lib
from optax_psf._src import policy as policy_lib
from optax_psf._src import reuse as reuse_lib
from optax_psf._src import statistics as stats_lib
from optax_psf._src import tree_math

GradFn = Callable[[optax.Params, int], optax.Updates]
StatsMask = Any  # A pytree of bools, or a callable from params to one.

# Hyperparameters of vsam that fix shapes or Python-side control flow. Pass
# them as static_args to optax.inject_hyperparams, which can then schedule rho.
STATIC_HYPERPARAMETERS = (
    "window",
    "blocks",
    "max_rate",
    "alpha",
    "beta",
    "max_reuse",
    "warmup_steps",
    "stats_mask",
    "psf_dtype",
    "axis_name",
    "seed",
)

GRAD_FN_SIGNATURE = (
    "grad_fn(params, i) -> grads, for example"
    " grad_fn = jax.grad(lambda params, _: loss_fn(params, batch))"
)


class PsfReuseState(NamedTuple):
    """State of the transformations built by :func:`psf_reuse`.

    Attributes:
      count: Update steps taken. shape=(), dtype=int32.
      second_gradients: Steps that called ``grad_fn``. shape=(), dtype=int32.
      target_rate: The policy's target fraction of sampled steps after the
        latest step. shape=(), dtype=float32.
      policy: State of the sampling policy.
      statistics: Histories of the sampled PSF.
      reuse: State of the reuse rule, with the PSF cache for vSAM.
      key: PRNG key of the policy's uniform draws. shape=(2,), dtype=uint32.
      plan: Decisions of the steps ``plan_start`` to
        ``plan_start + plan_length - 1``, computed ahead so that a host loop
        can read a whole window's decisions at once. shape=(window,),
        dtype=bool.
      plan_start: Value of ``count`` at the first planned step. shape=(),
        dtype=int32.
      plan_length: Number of final leading entries of ``plan``. shape=(),
        dtype=int32.
    """

    count: jax.Array
    second_gradients: jax.Array
    target_rate: jax.Array
    policy: Any
    statistics: stats_lib.PsfStatistics
    reuse: Any
    key: jax.Array
    plan: jax.Array
    plan_start: jax.Array
    plan_length: jax.Array


def psf_reuse(
    policy: policy_lib.SamplingPolicy,
    perturbation: perturbation_lib.Perturbation,
    reuse: reuse_lib.ReuseRule,
    *,
    window: int = 50,
    blocks: int = 5,
    stats_mask: StatsMask | None = None,
    axis_name: str | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Builds a sharpness-aware transformation that takes ``g_sam`` only on some steps.

    ``update(grads, state, params, *, grad_fn)`` receives the clean gradient
    ``g`` and returns the direction to descend. When the policy samples, it
    calls ``grad_fn`` once at the perturbed parameters, returns
    ``g_sam = grad_fn(perturbed_params, 0)``, records ``psf = g_sam - g`` in
    the statistics and hands it to the reuse rule. Otherwise it returns the
    reuse rule's direction and never calls ``grad_fn``: the choice is a
    ``jax.lax.cond`` inside the compiled step.

    Args:
      policy: Decides which steps sample.
      perturbation: Maps ``(params, g)`` to the parameters where ``g_sam`` is
        taken.
      reuse: Gives the direction on steps that skip ``g_sam``.
      window: Length of the statistics' histories.
      blocks: Number of blocks of the sorted PSF-norm history whose variances
        are averaged.
      stats_mask: Selects the parameters whose norms feed the statistics: a
        pytree of bools with the structure of the parameters, or a callable
        that maps the parameters to one. ``None`` selects all of them.
      axis_name: Under ``jax.pmap`` or ``shard_map``, the name of the axis that
        splits the batch. ``g_sam`` is averaged over it with
        ``jax.lax.pmean``, as is the pair of norms that feeds the statistics,
        so every device takes the same decisions. The clean gradient passed
        to ``update`` must already be averaged over the axis.
      seed: Seed of the PRNG key of the policy's uniform draws.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`PsfReuseState`.
    """
    check_window_blocks(window, blocks)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    if stats_mask is not None and not callable(stats_mask):
        _check_mask_leaves(stats_mask)
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a str or None, got {axis_name!r}.")

    def init_fn(params):
        check_not_masked(params)
        resolve_mask(stats_mask, params)
        policy_state = policy.init()
        statistics = stats_lib.init_statistics(window)
        key = jax.random.PRNGKey(seed)
        plan, plan_length = policy_lib.plan_decisions(policy, policy_state, statistics, key, window)
        state = PsfReuseState(
            count=jnp.zeros((), jnp.int32),
            second_gradients=jnp.zeros((), jnp.int32),
            target_rate=jnp.asarray(policy.target_rate(policy_state), jnp.float32),
            policy=policy_state,
            statistics=statistics,
            reuse=reuse.init(params),
            key=key,
            plan=plan,
            plan_start=jnp.zeros((), jnp.int32),
            plan_length=plan_length,
        )
        # The PSF cache follows the parameters' shardings; the rest is small
        # and is replicated over the parameters' mesh.
        return replicate_over_mesh_of(params, state)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        grad_fn=None,
        planned_sample=None,
        sampling_draw=None,
        **extra_args,
    ):
        """Returns the descent direction and the new state.

        Args:
          updates: The clean gradient ``g`` at ``params``.
          state: A :class:`PsfReuseState`.
          params: The current parameters.
          grad_fn: ``grad_fn(params, i) -> grads``, as in the opaque mode of
            ``optax.contrib.sam``; called with ``i = 0``.
          planned_sample: ``True`` or ``False`` to compile the step without a
            conditional, for a host loop that read this step's decision from
            ``state.plan`` (see :func:`optax_psf.make_train_step`). It must
            equal that decision. ``None`` decides inside the step.
          sampling_draw: For tests that replay recorded runs: the uniform draw
            in ``[0, 1)`` the policy uses at this step instead of one drawn
            from ``state.key``. Training code leaves it ``None``; with it,
            ``state.plan`` no longer predicts the decisions.
          **extra_args: Extra arguments of other transformations in a chain,
            ignored.
        """
        del extra_args
        if grad_fn is None or not callable(grad_fn):
            raise TypeError(
                f"update() needs a gradient function passed as grad_fn=, got"
                f" {grad_fn!r}. Expected signature: {GRAD_FN_SIGNATURE}."
            )
        check_grad_fn_signature(grad_fn)
        if params is None:
            raise ValueError("update() needs params: the perturbation is taken at them.")
        check_not_masked(params)
        if planned_sample not in (None, True, False):
            raise TypeError(f"planned_sample must be None, True or False, got {planned_sample!r}.")
        mask = resolve_mask(stats_mask, params)
        grads = updates

        key, u = policy_lib.split_draw(state.key)
        if sampling_draw is not None:
            u = sampling_draw
        sample, policy_state = policy.decide(
            state.policy, state.statistics, jnp.asarray(u, jnp.float32)
        )

        def take_second_gradient():
            perturbed = perturbation.apply(params, grads)
            grads_sam = grad_fn(perturbed, 0)
            if axis_name is not None:
                grads_sam = jax.lax.pmean(grads_sam, axis_name)
            grads_sam = jax.tree.map(lambda gs, g: gs.astype(g.dtype), grads_sam, grads)
            psf = jax.tree.map(jnp.subtract, grads_sam, grads)
            norms = (tree_math.masked_norm(psf, mask), tree_math.masked_norm(grads, mask))
            if axis_name is not None:
                # Equal on every device when the clean gradient was averaged;
                # averaging guards the decisions against rounding differences.
                # NOTE: this assumes the parameters are replicated over the
                # axis; parameters sharded over it would need summed norms.
                norms = jax.lax.pmean(norms, axis_name)
            statistics = stats_lib.record_sample(state.statistics, *norms, blocks)
            return grads_sam, statistics, reuse.store(state.reuse, psf)

        def reuse_cached_psf():
            direction, reuse_state = reuse.apply(state.reuse, grads)
            return direction, state.statistics, reuse_state

        # With a fixed policy, a planned step, or outside jit, the decision is
        # known in Python: run one branch rather than compiling a conditional.
        take_sample = policy.static_decision
        if take_sample is None and planned_sample is not None:
            take_sample = planned_sample
            sample = jnp.asarray(planned_sample)
        if take_sample is None and not isinstance(sample, jax.core.Tracer):
            take_sample = bool(sample)

        if take_sample is None:
            direction, statistics, reuse_state = jax.lax.cond(
                sample, take_second_gradient, reuse_cached_psf
            )
        elif take_sample:
            direction, statistics, reuse_state = take_second_gradient()
        else:
            direction, statistics, reuse_state = reuse_cached_psf()

        count = optax.safe_increment(state.count)
        plan, plan_start, plan_length = refresh_plan(state, count, policy_state, statistics, key)
        return direction, PsfReuseState(
            count=count,
            second_gradients=state.second_gradients + sample.astype(jnp.int32),
            target_rate=jnp.asarray(policy.target_rate(policy_state), jnp.float32),
            policy=policy_state,
            statistics=statistics,
            reuse=reuse_state,
            key=key,
            plan=plan,
            plan_start=plan_start,
            plan_length=plan_length,
        )

    def refresh_plan(state, count, policy_state, statistics, key):
        """Plans the next steps once the current plan is used up."""

        def new_plan():
            plan, length = policy_lib.plan_decisions(policy, policy_state, statistics, key, window)
            return plan, count, length

        def current_plan():
            return state.plan, state.plan_start, state.plan_length

        if policy.static_decision is not None:
            # A fixed policy's plan holds for every step: move its start along.
            return state.plan, count, state.plan_length
        used_up = count >= state.plan_start + state.plan_length
        if isinstance(used_up, jax.core.Tracer):
            return jax.lax.cond(used_up, new_plan, current_plan)
        return new_plan() if used_up else current_plan()

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vsam(
    rho: float = 0.05,
    *,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    alpha: tuple[float, float] = (0.13, 0.13),
    beta: float = 0.7,
    max_reuse: int = 6,
    warmup_steps: int | None = None,
    stats_mask: StatsMask | None = None,
    psf_dtype: Any | None = None,
    axis_name: str | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """vSAM: SAM that takes the second gradient only on some steps.

    SAM's direction ``g_sam`` is split as ``g + psf``. vSAM computes
    ``g_sam`` on the steps its controller samples and caches the PSF; on the
    other steps it returns ``g + beta**k * psf_cached`` for the first
    ``max_reuse`` steps after a sample and ``g`` after that. The controller
    raises the number of samples per window when the PSF statistics vary more
    and lowers it when they settle. Chain it in front of the optimizer:

      >>> import jax, jax.numpy as jnp, optax, optax_psf
      >>> params = {"w": jnp.ones(3)}
      >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
      >>> tx = optax.chain(optax_psf.vsam(rho=0.05), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> updates, state = tx.update(
      ...     grads, state, params, grad_fn=lambda p, _: jax.grad(loss_fn)(p))
      >>> params = optax.apply_updates(params, updates)

    Args:
      rho: Radius of SAM's perturbation ``rho * g / ||g||``.
      window: Steps per window of the controller, ``K``.
      blocks: Blocks the sorted PSF-norm history is split into; must divide
        ``window`` into blocks of at least 2.
      max_rate: Largest fraction of a window that samples, in ``(0, 1]``.
      alpha: ``(alpha_ratio, alpha_variance)``: sensitivity of the sampling
        rate to the relative change of ``||psf|| / ||g||`` and of the PSF-norm
        variance. Any finite numbers; a negative value makes the rate fall
        when that statistic grows. The authors' training script uses
        ``(0.13, 0.13)``.
      beta: Decay of the cached PSF's weight per reuse, in ``(0, 1)``.
      max_reuse: Skipped steps after a sample that reuse the cached PSF.
      warmup_steps: Steps at the start that all sample. The authors warm up
        for 3 epochs; the default ``None`` means ``window`` steps, the fewest
        that fill the statistics' histories.
      stats_mask: Parameters whose norms feed the controller: a pytree of bools
        matching the parameters, or a callable mapping the parameters to one.
        ``None`` selects all parameters.
      psf_dtype: dtype of the cached PSF, for example ``jnp.bfloat16`` to halve
        its memory. ``None`` keeps each parameter's dtype.
      axis_name: Name of the ``pmap`` or ``shard_map`` axis that splits the
        batch; see :func:`psf_reuse`.
      seed: Seed of the controller's random draws.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` needs
      ``params`` and ``grad_fn`` and returns the direction to descend.

    Raises:
      ValueError: If a hyperparameter is outside its valid range.

    References:
      Deng et al., `Effective Gradient Sample Size via Variation Estimation
      for Accelerating Sharpness aware Minimization
      <https://arxiv.org/abs/2403.08821>`_, 2024
    """
    window, blocks, max_rate, beta, max_reuse, warmup_steps, seed = (
        static_hyperparameter(name, value)
        for name, value in (
            ("window", window),
            ("blocks", blocks),
            ("max_rate", max_rate),
            ("beta", beta),
            ("max_reuse", max_reuse),
            ("warmup_steps", warmup_steps),
            ("seed", seed),
        )
    )
    return psf_reuse(
        policy=policy_lib.vsam_policy(
            window, max_rate=max_rate, alpha=alpha, warmup_steps=warmup_steps
        ),
        perturbation=perturbation_lib.sam_perturbation(rho),
        reuse=reuse_lib.decayed_psf(beta, max_reuse, psf_dtype=psf_dtype),
        window=window,
        blocks=blocks,
        stats_mask=stats_mask,
        axis_name=axis_name,
        seed=seed,
    )


def sam(
    rho: float = 0.05, *, stats_mask: StatsMask | None = None, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """SAM as a transformation that takes the second gradient on every step.

    The same engine as :func:`vsam` with a policy that always samples and no
    PSF cache, so its metrics are comparable with vSAM's.

    Args:
      rho: Radius of the perturbation ``rho * g / ||g||``.
      stats_mask: Parameters whose norms feed the logged PSF statistics; see
        :func:`vsam`.
      axis_name: Name of the ``pmap`` or ``shard_map`` axis that splits the
        batch; ``g_sam`` is averaged over it, as ``optax.contrib.sam`` does with
        ``batch_axis_name``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` that returns ``g_sam``.

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    return psf_reuse(
        policy=policy_lib.always_sample(),
        perturbation=perturbation_lib.sam_perturbation(rho),
        reuse=reuse_lib.no_reuse(),
        stats_mask=stats_mask,
        axis_name=axis_name,
    )


def static_hyperparameter(name: str, value: Any) -> Any:
    """Returns ``value`` unless it is an array, which only ``rho`` may be.

    Raises:
      TypeError: If ``value`` is a JAX or NumPy array, as when
        ``optax.inject_hyperparams`` injects it.
    """
    if isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{name} must be a Python number, got an array: only rho can be injected or"
            " scheduled. optax.inject_hyperparams turns every numeric argument, defaults"
            " included, into an array unless it is listed in static_args; pass"
            " static_args=optax_psf.STATIC_HYPERPARAMETERS."
        )
    return value


def check_grad_fn_signature(grad_fn: Callable[..., Any]) -> None:
    """Raises if ``grad_fn`` cannot be called with ``(params, i)``."""
    try:
        signature = inspect.signature(grad_fn)
    except (TypeError, ValueError):
        return  # Some callables have no signature to inspect; trust them.
    try:
        signature.bind(None, 0)
    except TypeError:
        raise TypeError(
            f"grad_fn must accept two positional arguments (params, i), got a callable with"
            f" signature {signature}. Expected signature: {GRAD_FN_SIGNATURE}."
        ) from None


def replicate_over_mesh_of(params: optax.Params, state: Any) -> Any:
    """Replicates the leaves of ``state`` that lack a ``NamedSharding`` over the
    mesh of the sharded ``params``.

    Leaves that already have one, like the PSF cache built with ``zeros_like``
    from sharded parameters, keep it. Returns ``state`` unchanged when no
    parameter has a ``NamedSharding``, including under ``jax.jit``, where the
    caller chooses shardings.
    """

    def named_sharding(leaf):
        concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        if concrete and isinstance(leaf.sharding, jax.sharding.NamedSharding):
            return leaf.sharding
        return None

    shardings = [s for s in map(named_sharding, jax.tree.leaves(params)) if s is not None]
    if not shardings:
        return state
    replicated = jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda leaf: leaf if named_sharding(leaf) else jax.device_put(leaf, replicated), state
    )


def check_not_masked(params: optax.Params) -> None:
    """Raises if ``params`` comes from ``optax.masked`` or ``optax.multi_transform``.

    Those wrappers hide the other parameters from the inner transformation, so
    the perturbation and ``grad_fn`` would see only part of the model.
    """
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    if any(isinstance(leaf, optax.MaskedNode) for leaf in leaves):
        raise ValueError(
            "optax_psf transformations cannot run inside optax.masked or"
            " optax.multi_transform: they must see every parameter to perturb the"
            " model and call grad_fn. Put vsam or sam first in the chain and freeze"
            " parameters in the optimizer after it, for example"
            " optax.chain(optax_psf.vsam(), optax.multi_transform({'train': optax.sgd(0.1),"
            " 'frozen': optax.set_to_zero()}, labels))."
        )


def check_window_blocks(window: int, blocks: int) -> None:
    """Raises unless ``blocks`` splits ``window`` into equal blocks of >= 2."""
    policy_lib.check_window(window)
    if not isinstance(blocks, numbers.Integral) or isinstance(blocks, bool) or blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {blocks!r}.")
    if window % blocks != 0 or window // blocks < 2:
        raise ValueError(
            f"blocks must divide window into equal blocks of at least 2 steps,"
            f" got blocks={blocks!r} for window={window!r}."
        )


def resolve_mask(stats_mask: StatsMask | None, params: optax.Params) -> Any:
    """Returns the statistics mask as a pytree of bools matching ``params``."""
    if stats_mask is None:
        return jax.tree.map(lambda _: True, params)
    mask = stats_mask(params) if callable(stats_mask) else stats_mask
    _check_mask_leaves(mask)
    params_structure = jax.tree.structure(params)
    mask_structure = jax.tree.structure(mask)
    if mask_structure != params_structure:
        raise ValueError(
            "stats_mask must have the structure of the parameters, got"
            f" {mask_structure} for parameters {params_structure}."
        )
    if not any(jax.tree.leaves(mask)):
        raise ValueError("stats_mask selects no parameter: at least one leaf must be True.")
    return mask


def _check_mask_leaves(mask: Any) -> None:
    for leaf in jax.tree.leaves(mask):
        if not isinstance(leaf, (bool, np.bool_)):
            raise ValueError(
                f"stats_mask leaves must be Python bools, got {leaf!r} of type"
                f" {type(leaf).__name__}."
            )
