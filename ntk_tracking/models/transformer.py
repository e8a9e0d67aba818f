"""A transformer encoder tagger (after flax examples/nlp_seq): summed feature embeddings, learned
positions, pre-LayerNorm blocks, dropout and a per-token read-out.

Every weight matrix is an `nn.Dense`, so the NTK engine's structured derivatives cover them; the
embedding table is a bias-free Dense as well, read by lookup in training and applied to the
tokens' multi-hot feature vectors under `one_hot_embedding=True` (the same function).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the tagger, passed whole (nlp_seq's TransformerConfig)."""

    vocab_size: int  # shared id space of all token features, 0 = padding
    num_tags: int
    max_length: int = 64
    model_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    one_hot_embedding: bool = False  # multi-hot @ table instead of lookup: for the NTK's structured rule

    def __post_init__(self):
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim={self.model_dim} must be divisible by num_heads={self.num_heads}")


class FeatureEmbedding(nn.Module):
    """Sum of the embeddings of a token's feature ids: (..., F) ids -> (..., D)."""

    vocab_size: int
    features: int

    def setup(self):
        self.table = nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.normal(1.0))

    def __call__(self, ids, one_hot: bool = False):
        if self.is_initializing():  # creates the table without a (…, F, vocab) one-hot array
            self.table(jnp.zeros((1, self.vocab_size), self.table.param_dtype))
        if one_hot:
            hot = jnp.sum(jax.nn.one_hot(ids, self.vocab_size, dtype=self.table.param_dtype), axis=-2)
            return self.table(hot)
        return jnp.sum(jnp.take(self.table.variables["params"]["kernel"], ids, axis=0), axis=-2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over real tokens only (padding keys masked out)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        cfg = self.config
        *batch, length, dim = x.shape
        head_dim = dim // cfg.num_heads
        qkv = nn.Dense(3 * dim, name="qkv")(x).reshape(*batch, length, 3, cfg.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        logits = jnp.where(mask[..., None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = nn.Dropout(cfg.attention_dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*batch, length, dim)
        return nn.Dense(dim, name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm: x + attention(LN x), then x + MLP(LN x)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        cfg = self.config
        y = SelfAttention(cfg)(nn.LayerNorm()(x), mask, deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = nn.Dense(cfg.mlp_dim)(nn.LayerNorm()(x))
        y = nn.Dense(cfg.model_dim)(nn.gelu(y))
        return x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class TransformerTagger(nn.Module):
    """{"features": (B, L, F) ids, "mask": (B, L) bool} -> tag logits (B, L, num_tags)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        cfg = self.config
        ids, mask = inputs["features"], inputs["mask"].astype(bool)
        length = ids.shape[-2]
        if length > cfg.max_length:
            raise ValueError(f"sequences of {length} tokens exceed max_length={cfg.max_length}")
        x = FeatureEmbedding(cfg.vocab_size, cfg.model_dim, name="embed")(ids, one_hot=cfg.one_hot_embedding)
        x = x / jnp.sqrt(ids.shape[-1]).astype(x.dtype)  # unit variance: a sum of F unit embeddings
        positions = self.param("positions", nn.initializers.normal(0.02), (cfg.max_length, cfg.model_dim))
        x = x + positions[:length].astype(x.dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
        for i in range(cfg.num_layers):
            x = EncoderBlock(cfg, name=f"block_{i}")(x, mask, deterministic=not train)
        return nn.Dense(cfg.num_tags, name="readout")(nn.LayerNorm()(x))


def make(config, data_info: dict) -> TransformerTagger:
    """The tagger a task config describes (`max_length`, `model_dim`, `num_heads`, `num_layers`,
    `mlp_dim`, dropout rates) over `data_info["vocab_size"]` feature ids and `data_info["num_tags"]`
    tags; its embedding is read by lookup (training). `with_one_hot_embedding` gives the NTK's view."""
    return _tagger(TransformerConfig(
        vocab_size=data_info["vocab_size"], num_tags=data_info["num_tags"], max_length=config.max_length,
        model_dim=config.model_dim, num_heads=config.num_heads, num_layers=config.num_layers,
        mlp_dim=config.mlp_dim, dropout_rate=config.dropout_rate,
        attention_dropout_rate=config.attention_dropout_rate))


def with_one_hot_embedding(model: TransformerTagger) -> TransformerTagger:
    """The same tagger (same function, same parameters) with its embedding applied to multi-hot
    feature vectors, which the NTK engine's structured rule for Dense layers covers."""
    return _tagger(dataclasses.replace(model.config, one_hot_embedding=True))


@functools.lru_cache(maxsize=16)
def _tagger(config: TransformerConfig) -> TransformerTagger:
    """One module object per configuration: equal apply functions, so jitted code is reused."""
    return TransformerTagger(config)
