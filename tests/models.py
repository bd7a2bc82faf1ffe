"""Small Flax models and data shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class MLP(nn.Module):
    """Two hidden layers with tanh, enough curvature for SAM to matter."""

    features: int = 16
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.features)(x))
        x = nn.tanh(nn.Dense(self.features)(x))
        return nn.Dense(self.classes)(x)


def make_problem(dtype=jnp.float32, samples=64, features=8, classes=3, seed=0):
    """Returns ``(model, params, loss_fn)`` for a fixed classification batch.

    ``loss_fn(params)`` is the mean softmax cross-entropy on that batch.
    """
    data_key, label_key, init_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    inputs = jax.random.normal(data_key, (samples, features)).astype(dtype)
    labels = jax.random.randint(label_key, (samples,), 0, classes)
    model = MLP(classes=classes)
    params = model.init(init_key, inputs)
    params = jax.tree.map(lambda p: p.astype(dtype), params)

    def loss_fn(params):
        logits = model.apply(params, inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return model, params, loss_fn
