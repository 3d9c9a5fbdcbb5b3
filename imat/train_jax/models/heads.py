"""Heads on top of the pooled backbone features: the L2-normalised embedding projection and
the 4-way rotation classifier. Neither exists in torchvision, so pretrained weights never
cover them (they are always freshly initialised).

Export notes:
- ``EmbeddingHead.proj`` is an ``nnx.Linear(F, D)`` (kernel [F, D], bias [D]); the output is
  ``z = proj(pooled)`` then ``z * rsqrt(max(sum(z**2, -1, keepdims=True), EMBED_EPSILON**2))``,
  i.e. torch's ``F.normalize(z, eps=1e-12)`` (EMBED_EPSILON = 1e-12): a zero vector stays zero
  instead of NaN (value and gradient), and even a very small vector is normalised to unit length.
- The rotation head is a plain ``nnx.Linear(F, 4)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

EMBED_EPSILON = 1e-12


def l2_normalize(z: jax.Array, epsilon: float = EMBED_EPSILON) -> jax.Array:
    """Row-wise ``z / max(|z|, eps)``: unit norm for any row with |z| > eps, 0 (not NaN) for a zero row.
    Written as ``rsqrt(max(|z|^2, eps^2))`` so the gradient at z = 0 is finite too."""
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), epsilon * epsilon))


class EmbeddingHead(nnx.Module):
    """Dense(pooled -> embedding_dim) followed by L2 normalisation."""

    def __init__(self, in_features: int, embedding_dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(in_features, embedding_dim, rngs=rngs)
        self.epsilon = EMBED_EPSILON

    def __call__(self, pooled: jax.Array) -> jax.Array:
        return l2_normalize(self.proj(pooled), self.epsilon)


def rotation_head(in_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """The 4-way (0/90/180/270 degrees) rotation classifier."""
    return nnx.Linear(in_features, 4, rngs=rngs)


def head_outputs(model: nnx.Module, pooled: jax.Array, logits: jax.Array) -> dict[str, jax.Array]:
    """The output dict every imat model returns, from its pooled features and classifier logits."""
    out = {"pooled": pooled, "logits": logits, "embedding": model.embedding_head(pooled)}
    if model.rotation_head is not None:
        out["rotation_logits"] = model.rotation_head(pooled)
    return out
