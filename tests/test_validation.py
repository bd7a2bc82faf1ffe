"""Invalid hyperparameters and calls raise errors that name the argument."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import optax_psf

INVALID_VSAM_ARGUMENTS = [
    ("rho", -0.1),
    ("rho", math.inf),
    ("window", 1),
    ("window", 0),
    ("blocks", 3),  # 50 % 3 != 0
    ("blocks", 50),  # blocks of one step
    ("blocks", 0),
    ("max_rate", 0.0),
    ("max_rate", 1.5),
    ("max_rate", -0.2),
    ("beta", 0.0),
    ("beta", 1.0),
    ("beta", 1.2),
    ("max_reuse", -1),
    ("max_reuse", 1.5),
    ("warmup_steps", -1),
    ("warmup_steps", 2.5),
    ("alpha", 0.13),
    ("alpha", (0.1,)),
    ("alpha", (0.1, 0.2, 0.3)),
    ("alpha", (0.1, math.nan)),
    ("alpha", (0.1, "0.2")),
]


@pytest.mark.parametrize(("name", "value"), INVALID_VSAM_ARGUMENTS)
def test_vsam_rejects_invalid_argument(name, value):
    with pytest.raises(ValueError) as error:
        optax_psf.vsam(**{name: value})
    assert name in str(error.value)
    assert repr(value) in str(error.value)


def test_window_too_small_for_max_rate():
    with pytest.raises(ValueError, match="max_rate"):
        optax_psf.vsam(window=4, blocks=2, max_rate=0.2)


@pytest.mark.parametrize("value", ["0.05", None, True])
def test_rho_of_wrong_type(value):
    with pytest.raises(TypeError, match="rho"):
        optax_psf.vsam(rho=value)


def test_sam_rejects_negative_rho():
    with pytest.raises(ValueError, match="rho"):
        optax_psf.sam(-1.0)


PARAMS = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "head": jnp.ones(3)}


@pytest.mark.parametrize(
    "mask",
    [
        {"dense": True, "head": False},
        {"dense": {"kernel": True, "bias": False}},
        lambda params: {"dense": True},
    ],
)
def test_stats_mask_structure_mismatch_raises_at_init(mask):
    tx = optax_psf.vsam(stats_mask=mask)
    with pytest.raises(ValueError, match="stats_mask"):
        tx.init(PARAMS)


def test_stats_mask_selecting_nothing_raises():
    mask = {"dense": {"kernel": False, "bias": False}, "head": False}
    with pytest.raises(ValueError, match="stats_mask"):
        optax_psf.vsam(stats_mask=mask).init(PARAMS)


def test_stats_mask_with_non_bool_leaf_raises():
    with pytest.raises(ValueError, match="stats_mask"):
        optax_psf.vsam(stats_mask={"dense": {"kernel": 1, "bias": 0}, "head": 1})


@pytest.mark.parametrize("build", [optax_psf.vsam, optax_psf.sam])
def test_update_without_grad_fn_names_grad_fn(build):
    tx = build()
    state = tx.init(PARAMS)
    with pytest.raises(TypeError) as error:
        tx.update(PARAMS, state, PARAMS)
    assert "grad_fn" in str(error.value)
    assert "grad_fn(params, i)" in str(error.value)


def test_grad_fn_with_one_argument_raises():
    tx = optax_psf.vsam()
    state = tx.init(PARAMS)
    with pytest.raises(TypeError) as error:
        tx.update(PARAMS, state, PARAMS, grad_fn=lambda params: params)
    assert "grad_fn" in str(error.value)
    assert "(params, i)" in str(error.value)


def test_numpy_rho_is_accepted():
    tx = optax_psf.vsam(rho=np.float32(0.05))
    assert tx.init(PARAMS) is not None


def test_update_without_params_raises():
    tx = optax_psf.vsam()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params"):
        tx.update(PARAMS, state, None, grad_fn=lambda p, i: p)
