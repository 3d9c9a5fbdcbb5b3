"""Validation during training: the objective's metrics and retrieval mAP@k of every trained output.

``Evaluator(state)`` runs the objective's eval step over up to ``max_eval_batches`` validation
batches (eval mode) and, for the output model.onnx will serve and each other output the
objective trains (``ObjectiveSpec.embedding_candidates``), leave-one-out ``map@k`` over the
validation split (``map@k`` for the served one, ``map@k_<output>`` for the others).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imat.train_jax import sharding
from imat.train_jax.metrics import MetricAccumulator, retrieval_map_at_k


def _to_host(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def retrieval_outputs(outputs: dict) -> dict:
    """The model outputs that can serve as retrieval vectors (spec.EMBEDDING_SOURCES)."""
    res = {"pooled": outputs["pooled"], "embedding": outputs["embedding"]}
    if "logits" in outputs:
        res["probabilities"] = jax.nn.sigmoid(outputs["logits"].astype(jnp.float32))
    return res


def make_eval_steps(eval_graphdef, loss_and_metrics, options: dict):
    """(eval_step(model_state, batch) -> metrics, embed(model_state, images) -> outputs), eval mode, jitted."""

    @jax.jit
    def eval_step(model_state, batch):
        outputs = nnx.merge(eval_graphdef, model_state)(batch["images"])
        return loss_and_metrics(outputs, batch, **options)[1]

    @jax.jit
    def embed(model_state, images):
        return retrieval_outputs(nnx.merge(eval_graphdef, model_state)(images))

    return eval_step, embed


class Evaluator:
    """Validation metrics of a model state (see module doc)."""

    def __init__(self, config, mesh, val_source, val_split, eval_step, embed):
        self.config, self.mesh = config, mesh
        self.val_source, self.val_split = val_source, val_split
        self.eval_step, self.embed = eval_step, embed
        served = config.retrieval_output
        self.candidates = (served, *[c for c in config.spec.embedding_candidates() if c != served])

    def features(self, model_state) -> dict[str, np.ndarray]:
        """Retrieval features of every validation image (padded fixed-size chunks: one compile)."""
        n, b = self.val_split.num_examples, self.config.batch_size
        sharding_ = sharding.batch_sharding(self.mesh)
        out: dict[str, list] = {k: [] for k in self.candidates}
        for start in range(0, n, b):
            chunk = self.val_split.images(np.arange(start, min(start + b, n)))
            real = len(chunk)
            if real < b:
                chunk = np.concatenate([chunk, np.zeros((b - real, *chunk.shape[1:]), chunk.dtype)])
            # Every process holds the whole chunk; each supplies the rows of its own devices.
            images = jax.make_array_from_callback(chunk.shape, sharding_, lambda idx, c=chunk: c[idx])
            feats = _to_host(self.embed(model_state, images))
            for k in out:
                out[k].append(np.asarray(feats[k])[:real])
        return {k: np.concatenate(v) for k, v in out.items()}

    def __call__(self, model_state) -> dict[str, float]:
        acc = MetricAccumulator()
        num_batches = min(self.val_source.steps_per_epoch, self.config.max_eval_batches)
        for batch in self.val_source.iterate(0, num_batches):
            acc.update(jax.device_get(self.eval_step(model_state, sharding.shard_batch(batch, self.mesh))))
        result = acc.compute()
        feats = self.features(model_state)
        k, cats = self.config.map_k, self.val_split.categories
        for i, name in enumerate(self.candidates):
            key = f"map@{k}" if i == 0 else f"map@{k}_{name}"
            result[key] = retrieval_map_at_k(feats[name], cats, k=k, threshold=self.config.positive_threshold)
        return result
