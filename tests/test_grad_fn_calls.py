"""A skipped step must not run grad_fn; a sampled step runs it exactly once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_psf

WINDOW = 10


class GradFnCallsTest(chex.TestCase):
    def make_counting_grad_fn(self, calls):
        target = jnp.arange(4.0)

        def loss_fn(params):
            return jnp.sum((params - target) ** 2)

        def grad_fn(params, i):
            # The callback runs when the compiled branch executes, not when it
            # is traced, so it counts real evaluations.
            jax.debug.callback(lambda: calls.append(1))
            return jax.grad(loss_fn)(params)

        return loss_fn, grad_fn

    @chex.variants(with_jit=True, without_jit=True)
    def test_calls_match_decisions(self):
        calls = []
        loss_fn, grad_fn = self.make_counting_grad_fn(calls)
        tx = optax.chain(
            optax_psf.vsam(0.05, window=WINDOW, blocks=2, warmup_steps=3), optax.sgd(0.01)
        )
        params = jnp.zeros(4)
        state = tx.init(params)

        @self.variant
        def step(params, state):
            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        decisions = []
        for _ in range(4 * WINDOW):
            before = len(calls)
            previous = int(optax_psf.metrics(state)["second_gradients"])
            params, state = step(params, state)
            jax.block_until_ready(params)
            sampled = int(optax_psf.metrics(state)["second_gradients"]) > previous
            decisions.append(sampled)
            self.assertEqual(len(calls) - before, int(sampled))

        # The run must contain both kinds of step for the check to mean anything.
        self.assertIn(True, decisions[3:])
        self.assertIn(False, decisions)

    def test_never_sample_does_not_call_grad_fn(self):
        calls = []
        loss_fn, grad_fn = self.make_counting_grad_fn(calls)
        tx = optax_psf.psf_reuse(
            policy=optax_psf.never_sample(),
            perturbation=optax_psf.sam_perturbation(0.05),
            reuse=optax_psf.no_reuse(),
        )
        params = jnp.zeros(4)
        state = tx.init(params)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
        for _ in range(5):
            direction, state = update(jax.grad(loss_fn)(params), state, params)
        jax.block_until_ready(direction)
        self.assertEqual(calls, [])
        np.testing.assert_array_equal(direction, jax.grad(loss_fn)(params))
