"""The optimizer state survives serialization, and a resumed run continues exactly."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_psf

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "checkpoint_worker.py"
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.zeros(2)}


def trained_state(steps=7):
    tx = optax.chain(optax_psf.vsam(window=4, blocks=2, warmup_steps=2), optax.adam(1e-2))
    state = tx.init(PARAMS)
    grad_fn = jax.grad(lambda p, _: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2))
    for _ in range(steps):
        grads = grad_fn(PARAMS, 0)
        _, state = tx.update(grads, state, PARAMS, grad_fn=grad_fn)
    return tx, state


def test_state_round_trips_through_orbax(tmp_path):
    _, state = trained_state()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
        tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored, state)
    assert isinstance(optax_psf.find_state(restored), optax_psf.PsfReuseState)


def test_state_round_trips_through_flattening(tmp_path):
    _, state = trained_state()
    leaves, treedef = jax.tree.flatten(state)
    np.savez(tmp_path / "state.npz", *[np.asarray(leaf) for leaf in leaves])
    with np.load(tmp_path / "state.npz") as saved:
        loaded = [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(leaves))]
    restored = jax.tree.unflatten(treedef, loaded)
    chex.assert_trees_all_equal(restored, state)


def run_worker(*args):
    # PYTHONPATH makes the worker import this checkout's optax_psf, not an
    # installed copy.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    completed = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_resume_mid_window_matches_uninterrupted_run(tmp_path):
    # Window 10 after 5 warm-up steps: step 23 is in the middle of a window.
    run_worker("--phase", "full", "--steps", 40, "--out", tmp_path / "full.json")
    run_worker("--phase", "first", "--steps", 23, "--dir", tmp_path / "checkpoint")
    run_worker(
        "--phase",
        "resume",
        "--steps",
        40,
        "--dir",
        tmp_path / "checkpoint",
        "--out",
        tmp_path / "resumed.json",
    )

    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["first"] == 23
    assert resumed["second_gradients"] == full["second_gradients"][23:]
    sampled_after = np.diff([full["second_gradients"][22], *resumed["second_gradients"]])
    assert sampled_after.any()  # the resumed part samples at least once
    for leaf, expected in zip(resumed["params"], full["params"], strict=True):
        expected = np.asarray(expected)
        np.testing.assert_allclose(leaf, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
