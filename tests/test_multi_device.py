"""vSAM on 4 simulated CPU devices: pmap, jit over a Mesh and shard_map.

JAX reads the device count when it starts, so the runs happen in a fresh
process of ``examples/multi_device.py``.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("pmap", "mesh_jit", "shard_map")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("multi_device") / "results.json"
    # PYTHONPATH makes the worker import this checkout's optax_psf, not an
    # installed copy.
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multi_device.py"), "--json", str(output)],
        cwd=ROOT / "examples",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("mode", MODES)
def test_devices_take_identical_decisions(results, mode):
    decisions = np.asarray(results[mode]["decisions"])
    assert decisions.shape[1] == 4
    np.testing.assert_array_equal(decisions, np.repeat(decisions[:, :1], 4, axis=1))


@pytest.mark.parametrize("mode", MODES)
def test_decisions_match_single_device(results, mode):
    single = np.asarray(results["single"]["decisions"])[:, 0]
    np.testing.assert_array_equal(np.asarray(results[mode]["decisions"])[:, 0], single)
    after_warmup = single[5:]
    assert after_warmup.any()
    assert not after_warmup.all()


@pytest.mark.parametrize("mode", MODES)
def test_params_match_single_device(results, mode):
    single = results["single"]["params"]
    for layer, values in results[mode]["params"].items():
        for name, value in values.items():
            expected = np.asarray(single[layer][name])
            scale = np.max(np.abs(expected))
            np.testing.assert_allclose(np.asarray(value), expected, rtol=0, atol=1e-5 * scale)
