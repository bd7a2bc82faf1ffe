"""Trains vSAM on MNIST-1D, stopping and resuming through an orbax checkpoint.

Run by tests/test_checkpoint.py in fresh processes:

    python tests/checkpoint_worker.py --phase full --steps 40 --out full.json
    python tests/checkpoint_worker.py --phase first --steps 23 --dir CKPT
    python tests/checkpoint_worker.py --phase resume --steps 40 --dir CKPT --out resumed.json
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import datasets
import models

import optax_psf

BATCH = 64


def setup():
    data = datasets.load_mnist1d(seed=0, num_samples=1000)
    model = models.build_model("cnn1d", data.num_classes)
    params = model.init(jax.random.PRNGKey(0), data.train_images[:1])["params"]
    tx = optax.chain(
        optax_psf.vsam(0.05, window=10, blocks=5, warmup_steps=5, max_rate=0.5),
        optax.sgd(0.02, momentum=0.9),
    )

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return data, params, tx, optax_psf.make_train_step(loss_fn, tx)


def batch_at(data, step):
    start = (step * BATCH) % (len(data.train_images) - BATCH)
    return data.train_images[start : start + BATCH], data.train_labels[start : start + BATCH]


def train(step_fn, data, params, opt_state, first, last):
    decisions = []
    for step in range(first, last):
        output = step_fn(params, opt_state, batch_at(data, step))
        params, opt_state = output.params, output.opt_state
        decisions.append(int(output.metrics["second_gradients"]))
    return params, opt_state, decisions


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phase",
        choices=("full", "first", "resume"),
        required=True,
        help="train all steps, train and save, or restore and finish",
    )
    parser.add_argument(
        "--steps", type=int, required=True, help="last step (exclusive) of this phase"
    )
    parser.add_argument("--dir", type=pathlib.Path, help="checkpoint directory")
    parser.add_argument("--out", type=pathlib.Path, help="JSON with decisions and parameters")
    args = parser.parse_args()

    data, params, tx, step_fn = setup()
    opt_state = tx.init(params)
    first = 0
    checkpointer = ocp.StandardCheckpointer()
    if args.phase == "resume":
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state, "step": 0}
        )
        restored = checkpointer.restore(args.dir.resolve() / "state", target)
        params, opt_state = restored["params"], restored["opt_state"]
        first = int(restored["step"])

    params, opt_state, decisions = train(step_fn, data, params, opt_state, first, args.steps)
    if args.phase == "first":
        checkpointer.save(
            args.dir.resolve() / "state",
            {"params": params, "opt_state": opt_state, "step": args.steps},
        )
        checkpointer.wait_until_finished()
    if args.out:
        result = {
            "first": first,
            "second_gradients": decisions,
            "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(params)],
        }
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
