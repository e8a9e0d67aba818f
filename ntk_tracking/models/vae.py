"""A dense variational autoencoder (flax examples/vae): 784 → 500 → (μ, log σ²) → 500 → 784 logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Encoder(nn.Module):
    """x ↦ (μ, log σ²) of the Gaussian posterior q(z | x)."""

    hidden: int = 500
    latents: int = 20

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.latents, name="mean")(h), nn.Dense(self.latents, name="logvar")(h)


class Decoder(nn.Module):
    """z ↦ Bernoulli logits of the pixels."""

    hidden: int = 500
    outputs: int = 784

    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        return nn.Dense(self.outputs, name="logits")(h)


class VAE(nn.Module):
    """Encoder and decoder; `__call__` draws one reparameterized sample per point."""

    hidden: int = 500
    latents: int = 20
    outputs: int = 784

    def setup(self):
        self.encoder = Encoder(self.hidden, self.latents)
        self.decoder = Decoder(self.hidden, self.outputs)

    def __call__(self, x, rng):
        """(logits, μ, log σ²) with z = μ + σ·ε, ε ~ N(0, I) from `rng`."""
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decoder(z), mean, logvar

    def encode_mean(self, x):
        """μ(x): the encoder's mean."""
        return self.encoder(x)[0]

    def reconstruct(self, x):
        """decoder(μ(x)): the deterministic reconstruction logits."""
        return self.decoder(self.encoder(x)[0])

    def generate(self, z):
        """decoder(z) logits."""
        return self.decoder(z)


def make(config, data_info: dict) -> VAE:
    """The VAE of `config.hidden` units and `config.latents` latents over `data_info["num_pixels"]`
    pixels. One module serves every network of the task: `reconstruct` (decoder(μ(x))),
    `encode_mean` (μ(x), the encoder-only NTK) and `generate`, as `model.apply(..., method=...)`."""
    return VAE(hidden=config.hidden, latents=config.latents, outputs=data_info["num_pixels"])


def bernoulli_nll(logits, x):
    """−log p(x | logits) per point, summed over pixels; x in [0, 1]."""
    return jnp.sum(jnp.logaddexp(0.0, logits) - x * logits, axis=-1)


def gaussian_kl(mean, logvar):
    """KL(N(μ, σ²) ‖ N(0, I)) per point, summed over latents."""
    return -0.5 * jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
