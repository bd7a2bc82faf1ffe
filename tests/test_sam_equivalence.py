"""optax_psf.sam and the never-sample policy against optax's own optimizers."""

import chex
import jax
import jax.numpy as jnp
import optax
from absl.testing import parameterized

import optax_psf
from tests import models

STEPS = 100
RHO = 0.05
# bfloat16 keeps 8 bits of mantissa (spacing 2**-8, about 0.4%), and the two
# implementations round in different places. After 100 momentum steps they
# differ by at most 0.024 on this problem, while plain SGD ends 0.09 away.
TOLERANCES = {
    jnp.float32: {"rtol": 1e-5, "atol": 1e-6},
    jnp.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def run(tx, params, loss_fn, step_variant, steps=STEPS):
    grad_fn = jax.grad(lambda p, _: loss_fn(p))
    state = tx.init(params)

    @step_variant
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def base_optimizer():
    return optax.sgd(0.1, momentum=0.9)


class SamEquivalenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    def test_sam_matches_optax_contrib_sam(self, dtype):
        _, params, loss_fn = models.make_problem(dtype)
        ours = optax.chain(optax_psf.sam(RHO), base_optimizer())
        reference = optax.contrib.sam(
            base_optimizer(),
            optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
            opaque_mode=True,
        )

        ours_params, ours_state = run(ours, params, loss_fn, self.variant)
        reference_params, _ = run(reference, params, loss_fn, self.variant)

        chex.assert_trees_all_close(ours_params, reference_params, **TOLERANCES[dtype])
        chex.assert_trees_all_equal_dtypes(ours_params, params)
        self.assertEqual(int(optax_psf.metrics(ours_state)["second_gradients"]), STEPS)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    def test_never_sample_matches_base_optimizer(self, dtype):
        _, params, loss_fn = models.make_problem(dtype)
        never = optax_psf.psf_reuse(
            policy=optax_psf.never_sample(),
            perturbation=optax_psf.sam_perturbation(RHO),
            reuse=optax_psf.no_reuse(),
        )
        ours = optax.chain(never, base_optimizer())

        ours_params, ours_state = run(ours, params, loss_fn, self.variant)
        reference_params, _ = run(base_optimizer(), params, loss_fn, self.variant)

        # Both sides do the same arithmetic, so they agree to rounding in any dtype.
        chex.assert_trees_all_close(ours_params, reference_params, rtol=1e-6, atol=1e-7)
        self.assertEqual(int(optax_psf.metrics(ours_state)["second_gradients"]), 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_vsam_always_sampling_matches_sam(self):
        # With a warm-up covering the run, vSAM samples every step and must
        # then follow SAM exactly.
        _, params, loss_fn = models.make_problem()
        vsam = optax.chain(optax_psf.vsam(RHO, warmup_steps=STEPS), base_optimizer())
        sam = optax.chain(optax_psf.sam(RHO), base_optimizer())

        vsam_params, _ = run(vsam, params, loss_fn, self.variant)
        sam_params, _ = run(sam, params, loss_fn, self.variant)

        chex.assert_trees_all_close(vsam_params, sam_params, rtol=1e-6, atol=1e-7)
