"""The two reference networks of the neural-tangents comparison (flax only, so that the legacy
environment of nt_side_by_side.py can build them too)."""

import flax.linen as nn


class MLP(nn.Module):
    """ReLU 784→512×3→10."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for _ in range(3):
            x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """Keras' MNIST convnet: VALID 3×3 convolutions, 28→26→24, pool to 12×12×64, dense 128, 10."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


NETWORKS = {"mlp": MLP, "cnn": CNN}
