"""Replays the reference implementation's recorded traces through optax_psf.vsam.

The traces were recorded from the authors' PyTorch vSAM with designed
gradients: ``grad_fn`` returns the recorded ``gsam`` whatever the parameters,
and the recorded uniform draw of each step is injected through the
``sampling_draw`` argument of ``update``.
"""

import json
import pathlib

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import optax_psf

TRACES_PATH = pathlib.Path(__file__).parent / "data" / "vsam_reference_traces.json"
TRACES = json.loads(TRACES_PATH.read_text())["traces"]
TOLERANCE = 1e-5


def build_vsam(config):
    return optax_psf.vsam(
        config["rho"],
        window=config["window"],
        blocks=config["blocks"],
        max_rate=config["max_rate"],
        alpha=tuple(config["alpha"]),
        beta=config["beta"],
        warmup_steps=config["warmup_steps"],
    )


class ReferenceReplayTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"{trace['scenario']}_{trace['seed']}", index) for index, trace in enumerate(TRACES)
    )
    def test_replay_matches_reference(self, trace_index):
        trace = TRACES[trace_index]
        tx = build_vsam(trace["config"])
        params = jnp.zeros(trace["config"]["dim"], jnp.float32)
        state = tx.init(params)

        @self.variant
        def step(state, grads, grads_sam, u):
            return tx.update(grads, state, params, grad_fn=lambda p, i: grads_sam, sampling_draw=u)

        for record in trace["records"]:
            calls_before = int(state.second_gradients)
            direction, state = step(
                state,
                jnp.asarray(record["g"], jnp.float32),
                jnp.asarray(record["gsam"], jnp.float32),
                jnp.float32(record["u"]),
            )
            where = f"{trace['scenario']} step {record['step']}"

            sampled = int(state.second_gradients) > calls_before
            self.assertEqual(sampled, record["sampled"], msg=f"decision at {where}")

            expected = np.asarray(record["update"])
            relative_error = np.linalg.norm(np.asarray(direction) - expected) / np.linalg.norm(
                expected
            )
            self.assertLessEqual(relative_error, TOLERANCE, msg=f"direction at {where}")

            rate_error = abs(float(state.policy.rate) - record["base_rate"]) / record["base_rate"]
            self.assertLessEqual(rate_error, TOLERANCE, msg=f"target rate at {where}")

            weight = float(state.reuse.weight)
            self.assertAlmostEqual(weight, record["psf_weight"], delta=TOLERANCE)

    def test_traces_cover_every_decision_kind(self):
        # The replay is only meaningful if the traces sample after warm-up,
        # reuse with a decaying weight and fall back to the clean gradient.
        for trace in TRACES:
            warmup = trace["config"]["warmup_steps"]
            after_warmup = trace["records"][warmup:]
            weights = {round(record["psf_weight"], 6) for record in after_warmup}
            self.assertTrue(any(record["sampled"] for record in after_warmup), trace["scenario"])
            self.assertIn(round(trace["config"]["beta"], 6), weights)
            self.assertGreater(len(weights), 3)
