"""Training-time image transforms on uint8 NHWC batches: random resized crop + flip, mixup, four rotations.

Only geometry and blending: colour is what shoppers search by, so no colour jitter (hue changes
would teach the model that a red coat and a blue one are the same). Mixup blends two photos and
their label vectors, keeping each photo's colours.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
from PIL import Image


def augment_batch(images: np.ndarray, rng: np.random.Generator, *, scale=(0.6, 1.0),
                  ratio=(3 / 4, 4 / 3), flip: bool = True, parallel: bool | None = None) -> np.ndarray:
    """Random resized crop (area fraction in `scale`, aspect in `ratio`) back to the input size,
    then a horizontal flip with probability 1/2. uint8 in, uint8 out, same shape.
    parallel: crop in a thread pool (default: for 16 images or more); the result is the same."""
    b, h, w = images.shape[:3]
    area = rng.uniform(scale[0], scale[1], b) * h * w
    log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), b)
    ar = np.exp(log_r)
    cw = np.clip(np.round(np.sqrt(area * ar)), 1, w).astype(int)
    ch = np.clip(np.round(np.sqrt(area / ar)), 1, h).astype(int)
    ux, uy = rng.random(b), rng.random(b)
    flips = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
    out = np.empty_like(images)

    def one(i: int) -> None:
        x0 = int(ux[i] * (w - cw[i] + 1))
        y0 = int(uy[i] * (h - ch[i] + 1))
        crop = images[i, y0:y0 + ch[i], x0:x0 + cw[i]]
        if crop.shape[:2] != (h, w):
            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
        out[i] = crop[:, ::-1] if flips[i] else crop

    # All random draws are made above, so running the crops in threads (PIL releases the GIL while
    # resizing) cannot change the result.
    if (b >= 16) if parallel is None else parallel:
        list(_augment_pool().map(one, range(b)))
    else:
        for i in range(b):
            one(i)
    return out


def mixup_batch(images: np.ndarray, labels: np.ndarray, alpha: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mixup (Zhang et al. 2018) within the batch: image i becomes ``lam_i * x_i + (1 - lam_i) * x_p(i)``
    for a random partner p(i) and ``lam_i ~ Beta(alpha, alpha)`` folded to >= 1/2 (the photo stays the
    larger part of its own example), and its label vector the same blend: soft multi-hot targets,
    which the sigmoid cross-entropy takes as they are. uint8 images in and out (rounded); labels
    float32."""
    b = len(images)
    partner = rng.permutation(b)
    lam = rng.beta(alpha, alpha, b).astype(np.float32)
    lam = np.maximum(lam, 1.0 - lam)
    lam_img = lam[:, None, None, None]
    mixed = lam_img * images.astype(np.float32) + (1.0 - lam_img) * images[partner].astype(np.float32)
    labels = labels.astype(np.float32)
    mixed_labels = lam[:, None] * labels + (1.0 - lam[:, None]) * labels[partner]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mixed_labels


_AUG_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_AUG_POOL_LOCK = threading.Lock()


def _augment_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _AUG_POOL
    with _AUG_POOL_LOCK:
        if _AUG_POOL is None:
            _AUG_POOL = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="imat-augment")
        return _AUG_POOL


def four_rotations(images: np.ndarray) -> np.ndarray:
    """uint8[4B,H,W,3] = [rot90(images, 0); rot90(images, 1); rot90(.., 2); rot90(.., 3)] (counter-clockwise).

    Each pixel is moved as one 3-byte item (a void view) rather than three uint8s: about twice as
    fast as rotating the uint8 array itself.
    """
    b, h, w, c = images.shape
    if h != w:
        raise ValueError(f"rotation batches need square images, got {h}x{w}")
    pixels = np.ascontiguousarray(images).view(np.dtype((np.void, c))).reshape(b, h, w)
    out = np.empty((4 * b, h, w), pixels.dtype)
    for k in range(4):
        out[k * b:(k + 1) * b] = np.rot90(pixels, k, axes=(1, 2))
    return out.view(np.uint8).reshape(4 * b, h, w, c)


