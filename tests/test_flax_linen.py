"""A Flax Linen CNN trains end to end on scikit-learn's digits with vSAM."""

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_psf


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


def test_linen_cnn_loss_falls_with_vsam():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    batch_size, epochs = 128, 4
    batches = len(images) // batch_size

    model = DigitsCNN()
    params = model.init(jax.random.PRNGKey(0), images[:1])
    tx = optax.chain(
        optax_psf.vsam(0.05, window=10, blocks=2, warmup_steps=10),
        optax.sgd(0.05, momentum=0.9),
    )
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, loss

    full_loss = jax.jit(loss_fn)
    initial_loss = float(full_loss(params, images, labels))
    order = np.random.default_rng(0).permutation(len(images))
    for _ in range(epochs):
        for b in range(batches):
            index = order[b * batch_size : (b + 1) * batch_size]
            params, opt_state, _ = train_step(params, opt_state, images[index], labels[index])
    final_loss = float(full_loss(params, images, labels))

    metrics = optax_psf.metrics(opt_state)
    steps = epochs * batches
    assert final_loss < 0.5 * initial_loss
    assert int(metrics["steps"]) == steps
    assert 10 <= int(metrics["second_gradients"]) < steps
    assert float(metrics["psf_norm"]) > 0
