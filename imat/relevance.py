"""The one relevance rule between two images, shared by samplers, losses, mining and metrics.

Two images are compared by the Jaccard index of their category sets, ``|A & B| / |A | B|``
(two empty sets: 0, so unlabelled images are never relevant). With thresholds from the
training config (``positive_threshold``, default 0.5; ``negative_threshold``, default 0.25):

* **positive** (relevant): Jaccard >= positive_threshold, "shares most of its garments";
* **negative**: Jaccard < negative_threshold (sharing nothing is always negative);
* in between: neither, never used as a triplet member.

Street photos nearly always share *some* category (shoes, bags), so "shares any" would make
every image a positive of every other; Jaccard does not. Functions take ``xp`` (numpy or
jax.numpy) so the jitted loss and the numpy samplers/metrics compute the very same masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

POSITIVE_THRESHOLD = 0.5
NEGATIVE_THRESHOLD = 0.25


@dataclasses.dataclass(frozen=True)
class Relevance:
    """The thresholds of the rule (see module doc)."""

    positive_threshold: float = POSITIVE_THRESHOLD
    negative_threshold: float = NEGATIVE_THRESHOLD

    def __post_init__(self):
        if not 0 < self.positive_threshold <= 1:
            raise ValueError(f"positive_threshold {self.positive_threshold!r} must be in (0, 1]")
        if not 0 <= self.negative_threshold <= self.positive_threshold:
            raise ValueError(f"negative_threshold {self.negative_threshold!r} must be in [0, positive_threshold]")

    def masks(self, categories, xp=np):
        """(positive, negative) boolean [N, N] masks over the rows of ``categories``; the diagonal is neither."""
        return relevance_masks(categories, self.positive_threshold, self.negative_threshold, xp=xp)


def jaccard(a, b=None, xp=np):
    """float [len(a), len(b)] Jaccard of the category sets in the rows of multi-hot ``a`` and ``b``
    (values >= 0.5 count as present; b defaults to a; empty-empty = 0)."""
    dtype = np.float64 if xp is np else xp.float32  # exact ratios for metrics; float32 under jit
    fa = (xp.asarray(a) >= 0.5).astype(dtype)
    fb = fa if b is None else (xp.asarray(b) >= 0.5).astype(dtype)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return xp.where(union > 0, inter / xp.maximum(union, 1.0), 0.0)


def relevance_masks(categories, positive_threshold: float = POSITIVE_THRESHOLD,
                    negative_threshold: float = NEGATIVE_THRESHOLD, xp=np):
    """(positive, negative) boolean [N, N] masks from multi-hot rows; an image is neither its own
    positive nor its own negative."""
    jac = jaccard(categories, xp=xp)
    not_self = ~xp.eye(jac.shape[0], dtype=bool)
    negative = (jac < negative_threshold) | (jac <= 0)  # sharing nothing is negative even at threshold 0
    return (jac >= positive_threshold) & not_self, negative & not_self
