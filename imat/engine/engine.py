"""Engine: one model.onnx, used to embed images, build/extend/search FAISS indexes and evaluate.

A thin composition of session (ONNX Runtime), embedder (decode pool + batches),
index (FAISS + sidecar), search (records) and evaluate (metrics).
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from imat.constants import RESIZE_MODES
from imat.engine.embedder import (
    EmbedError,
    EmbedResult,
    default_decode_threads,
    embed_items,
    item_label,
)
from imat.engine.evaluate import evaluate_embeddings
from imat.engine.gallery_index import GalleryIndex, build_gallery_index, load_index
from imat.engine.records import display_name, is_garment_crop, path_fields
from imat.engine.search import garment_query_fields, query_name, search_records
from imat.engine.session import ModelSession
from imat.errors import ConfigError, DataError, IndexFileError

logger = logging.getLogger(__name__)


def default_item_id(item: Any, row: int) -> str:
    """Path items are named by their file stem (bytes that are not UTF-8 as `\\xNN`), arrays by their row."""
    if isinstance(item, (str, os.PathLike)):
        return display_name(pathlib.Path(item).stem)
    return f"item-{row}"


def check_resize_mode(requested: str | None, metadata) -> None:
    """An explicit resize mode must be the model's own (None = use the model's): other pixels, other embeddings."""
    if requested is None:
        return
    if requested not in RESIZE_MODES:
        raise ConfigError(f"resize mode {requested!r} is not one of {', '.join(RESIZE_MODES)}")
    if requested != metadata.resize_mode:
        raise ConfigError(
            f"resize mode {requested!r} differs from the model's resize_mode {metadata.resize_mode!r} "
            f"({metadata.path}): the model was trained on {metadata.resize_mode} images; leave the resize mode "
            f"out (the model's is used) or use a model exported with {requested}"
        )


class Engine:
    """Serving engine over one model.onnx.

    `last_result` holds the EmbedResult (timings, errors) of the most recent embedding run,
    for callers that report throughput or skipped files.
    """

    def __init__(
        self,
        model_path,
        *,
        providers: Sequence[str] | None = None,
        decode_threads: int | None = None,
        batch_size: int = 64,
        intra_op_threads: int | None = None,
        progress: bool | None = None,
        resize_mode: str | None = None,
    ):
        """`resize_mode`: None uses the model's (its metadata); any other mode than the model's is refused.

        Threads: with neither `decode_threads` nor `intra_op_threads` the session runs one intra-op
        thread per lane and every embedding run splits the cores between decoders and model lanes from
        measured costs (`imat.engine.thread_plan`); explicit counts win (ORT gets the cores the
        decoders leave, as before)."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.decode_threads = decode_threads  # None: planned per run from measured costs
        self.batch_size = batch_size
        self.progress = progress
        adaptive = decode_threads is None and intra_op_threads is None
        self.session = ModelSession(
            model_path, providers=providers, intra_op_threads=1 if adaptive else intra_op_threads,
            decode_threads=decode_threads or default_decode_threads(),
        )
        self.model_path = pathlib.Path(model_path)
        self.metadata = self.session.metadata
        check_resize_mode(resize_mode, self.metadata)
        self.provider = self.session.provider
        self.last_result: EmbedResult | None = None

    # ------------------------------------------------------------ embedding

    def embed_result(self, items: Sequence[Any], *, desc: str = "embedding") -> EmbedResult:
        result = embed_items(
            self.session,
            items,
            batch_size=self.batch_size,
            decode_threads=self.decode_threads,
            progress=self.progress,
            desc=desc,
        )
        self.last_result = result
        return result

    def embed_with_errors(self, items: Sequence[Any]) -> tuple[np.ndarray, list[EmbedError]]:
        """(float32[M,D] embeddings of the good items, in order; errors of the bad ones)."""
        result = self.embed_result(items)
        return result.embeddings, result.errors

    def embed(self, items: Sequence[Any]) -> np.ndarray:
        """float32[N,D]; raises DataError (an ImatError) naming the first bad item when any fails."""
        result = self.embed_result(items)
        if result.errors:
            first = result.errors[0]
            more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
            raise DataError(f"{first.path}: {first.message}{more}; use embed_with_errors to skip bad items")
        return result.embeddings

    # ------------------------------------------------------------ indexes

    def _item_records(self, items, ok_indices, ids, labels, item_fields=None) -> list[dict]:
        records = []
        for row, i in enumerate(ok_indices):
            i = int(i)
            rec: dict = {"id": str(ids[i]) if ids is not None else default_item_id(items[i], i)}
            rec.update(path_fields(items[i]) if isinstance(items[i], (str, os.PathLike)) else {"path": None})
            if is_garment_crop(items[i]):   # a garment: its photo and its box there
                rec["path"], rec["box"] = str(items[i].path), list(items[i].box)
            if labels is not None:
                rec["categories"] = self._category_names(labels[i], where=rec["id"])
            if item_fields is not None:
                rec.update(item_fields[i])
            records.append(rec)
        return records

    def _category_names(self, cats, *, where: str) -> list[str]:
        names = self.metadata.category_names
        out = []
        for c in cats:
            if isinstance(c, (int, np.integer)):
                if not 0 <= int(c) < len(names):
                    raise DataError(f"item {where}: category id {c} is outside the model's {len(names)} categories")
                out.append(names[int(c)])
            else:
                out.append(str(c))
        return sorted(set(out), key=out.index)

    def _check_lengths(self, items, labels, ids) -> None:
        for name, seq in (("labels", labels), ("ids", ids)):
            if seq is not None and len(seq) != len(items):
                raise ConfigError(f"{name} has {len(seq)} entries for {len(items)} items")

    def build_index(
        self,
        items: Sequence[Any],
        out_dir,
        index_type: str = "auto",
        labels: Sequence[Sequence] | None = None,
        ids: Sequence[str] | None = None,
        *,
        memory_budget_bytes: int | None = None,
        resize_mode: str | None = None,
        item_fields: Sequence[dict] | None = None,
        extra_meta: dict | None = None,
    ) -> GalleryIndex:
        """Embed `items`, build the index and write it (atomically) to `out_dir`. Bad items are skipped.

        `resize_mode`: None uses the model's; another mode than the model's is refused (ConfigError).
        `item_fields[i]`: more fields of item i's record (garments: category, attributes);
        `extra_meta`: more sidecar fields."""
        check_resize_mode(resize_mode, self.metadata)
        items = list(items)
        if not items:
            raise DataError(f"no images to index for {out_dir}")
        self._check_lengths(items, labels, ids)
        result = self.embed_result(items, desc="indexing")
        if result.embeddings.shape[0] == 0:
            first = result.errors[0] if result.errors else None
            raise DataError(f"none of the {len(items)} images could be read (first: {first}); nothing to index")
        records = self._item_records(items, result.ok_indices, ids, labels, item_fields)
        gallery = build_gallery_index(
            result.embeddings,
            records,
            index_type,
            memory_budget_bytes=memory_budget_bytes,
            model_fingerprint=self.metadata.fingerprint,
            model_architecture=self.metadata.architecture,
            extra_meta={
                "model_objective": self.metadata.objective,
                "image_size": self.metadata.image_size,
                "resize_mode": self.metadata.resize_mode,
                "labelled": labels is not None,
                "skipped": len(result.errors),
                **(extra_meta or {}),
            },
        )
        gallery.save(out_dir)
        return gallery

    def load_index(self, directory) -> GalleryIndex:
        """Load an index and check it was built by this engine's model."""
        gallery = load_index(directory)
        meta = gallery.meta
        if meta["model_fingerprint"] != self.metadata.fingerprint:
            raise IndexFileError(
                f"{directory}: index was built by a different model (architecture {meta.get('model_architecture')}, "
                f"fingerprint {str(meta['model_fingerprint'])[:12]}, created {meta.get('created')}) than "
                f"{self.model_path} (architecture {self.metadata.architecture}, fingerprint "
                f"{self.metadata.fingerprint[:12]}); search with the model that built it or rebuild the index"
            )
        if gallery.dim != self.metadata.embedding_dim:
            raise IndexFileError(
                f"{directory}: index dimension {gallery.dim} differs from the model's embedding_dim "
                f"{self.metadata.embedding_dim}; rebuild the index"
            )
        return gallery

    def add_to_index(self, directory, items: Sequence[Any], labels=None, ids=None) -> GalleryIndex:
        """Embed `items` and append them to an existing index (new row ids follow); written atomically."""
        items = list(items)
        self._check_lengths(items, labels, ids)
        gallery = self.load_index(directory)
        if gallery.labelled and labels is None and gallery.count:
            raise ConfigError(f"{directory}: the index is labelled; pass labels for the new items")
        if not gallery.labelled and labels is not None and gallery.count:
            raise ConfigError(f"{directory}: the index has no labels; add the new items without labels")
        result = self.embed_result(items, desc="adding")
        if result.embeddings.shape[0]:
            records = self._item_records(items, result.ok_indices, ids, labels)
            gallery.add(result.embeddings, records)
            gallery.meta["skipped"] = int(gallery.meta.get("skipped", 0)) + len(result.errors)
            gallery.save(directory)
        else:
            logger.warning("none of the %d new items could be embedded; index unchanged", len(items))
        return gallery

    def remove_from_index(self, directory, ids: Sequence[str]) -> GalleryIndex:
        """Remove the items with these ids from an index folder (written atomically); DataError for an unknown id."""
        gallery = self.load_index(directory)
        removed = gallery.remove(ids)
        gallery.save(directory)
        logger.info("removed %d rows from %s", removed, directory)
        return gallery

    # ------------------------------------------------------------ search and evaluation

    def _embed_queries(self, items: Sequence[Any], k: int, index) -> tuple[GalleryIndex, list, EmbedResult]:
        """(the gallery, the queries as a list, their embeddings) after checking the search options."""
        if index is None:
            raise ConfigError("search needs an index (a GalleryIndex or an index folder)")
        gallery = index if isinstance(index, GalleryIndex) else self.load_index(index)
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        items = list(items)
        return gallery, items, self.embed_result(items, desc="searching")

    def search(self, items: Sequence[Any], k: int = 10, index: GalleryIndex | str | os.PathLike | None = None,
               *, min_score: float | None = None, categories: Sequence[str] | None = None,
               match: str = "any") -> list[dict]:
        """One result record per query (see imat.engine.search); bad queries get an `error` record.

        categories / match: return only items having any (match="any") or all ("all") of these names.
        """
        gallery, items, result = self._embed_queries(items, k, index)
        kwargs = {} if min_score is None else {"min_score": min_score}
        return search_records(
            gallery,
            items,
            result.embeddings,
            result.ok_indices,
            result.errors,
            k,
            category_names=self.metadata.category_names,
            probabilities=result.probabilities,
            categories=categories,
            match=match,
            **kwargs,
        )

    def evaluate(self, kaggle_root, k: int = 10, *, baseline_samples: int = 5, seed: int = 0) -> dict:
        """Leave-one-out retrieval and label metrics on a labelled folder (Kaggle layout or image-level)."""
        from imat.data_tools.sources import read_source

        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        ds = read_source(kaggle_root)
        if len(ds.records) < 2:
            raise DataError(f"{kaggle_root}: need at least 2 labelled images to evaluate, found {len(ds.records)}")
        paths = [rec.path for rec in ds.records]
        result = self.embed_result(paths, desc="evaluating")
        labels = ds.category_matrix()[result.ok_indices]
        probabilities = None
        if result.probabilities is not None:
            probabilities = self._probabilities_in(ds.labels.category_names, result.probabilities)
        out = evaluate_embeddings(
            result.embeddings, labels, k, probabilities=probabilities, baseline_samples=baseline_samples, seed=seed
        )
        out.update(
            {
                "root": str(kaggle_root),
                "model": str(self.model_path),
                "images": len(ds.records),
                "skipped_images": [str(e) for e in result.errors],
                "dataset_problems": len(ds.problems),
                "images_per_s": result.timings.images_per_s,
            }
        )
        return out

    def _probabilities_in(self, names: Sequence[str], probabilities: np.ndarray) -> np.ndarray | None:
        """Model probabilities re-ordered into the dataset's category columns (by name)."""
        model_names = list(self.metadata.category_names)
        if list(names) == model_names:
            return probabilities
        col = {n: j for j, n in enumerate(model_names)}
        if not all(n in col for n in names):
            logger.warning("model categories differ from the dataset's; model F1 not reported")
            return None
        return probabilities[:, [col[n] for n in names]]

    # ------------------------------------------------------------ garments

    @property
    def is_garment_model(self) -> bool:
        """The model was trained on garment crops (`imat data prepare --garments`)."""
        return str(self.metadata.extra.get("garment_model", "")).lower() == "true"

    @property
    def garment_padding(self) -> float:
        """The crop padding the model was trained with (its metadata), else the default."""
        from imat.data_tools.garments import DEFAULT_PADDING

        raw = self.metadata.extra.get("garment_padding")
        try:
            return float(raw) if raw is not None else DEFAULT_PADDING
        except ValueError:
            logger.warning("%s: metadata garment_padding %r is not a number; using %s", self.model_path, raw,
                           DEFAULT_PADDING)
            return DEFAULT_PADDING

    def garment_items(self, kaggle_root, options=None):
        """(GarmentSet, crops named `<ImageId>:<k>` padded as this model was trained) of a Kaggle folder."""
        from imat.data_tools.garments import GarmentOptions, crops_of, read_garments

        gs = read_garments(kaggle_root, options or GarmentOptions(padding=self.garment_padding))
        return gs, crops_of(gs, self.garment_padding)

    def build_garment_index(self, kaggle_root, out_dir, index_type: str = "auto", *, options=None,
                            memory_budget_bytes: int | None = None) -> GalleryIndex:
        """One row per garment of a Kaggle folder (id `<ImageId>:<k>`; path, box, category, attributes)."""
        gs, crops = self.garment_items(kaggle_root, options)
        cat_name = dict(zip(gs.labels.category_ids, gs.labels.category_names))
        attr_name = dict(zip(gs.labels.attribute_ids, gs.labels.attribute_names))
        fields = [{"category": cat_name[g.category_id], "attributes": [attr_name[a] for a in g.attribute_ids],
                   "image_id": g.image_id} for g in gs.garments]
        return self.build_index(crops, out_dir, index_type=index_type, labels=[[f["category"]] for f in fields],
                                ids=[c.name for c in crops], memory_budget_bytes=memory_budget_bytes,
                                item_fields=fields,
                                extra_meta={"garments": True, "garment_padding": self.garment_padding,
                                            "garment_counts": gs.counts()})

    def search_within_predicted(self, items: Sequence[Any], k: int = 10,
                                index: GalleryIndex | str | os.PathLike | None = None) -> list[dict]:
        """Search each query only among items of its predicted category (the model's top probability).

        Each record says so: "category_filter": [name], "category_filter_source": "model". Without a
        classifier head, or on an unlabelled index, or when no item has the predicted category, the
        query searches every item and its record has "category_filter": null with the reason.
        """
        gallery, items, result = self._embed_queries(items, k, index)
        names = list(self.metadata.category_names)
        known = set(gallery.category_names()) if gallery.labelled else set()
        groups: dict[str | None, list[int]] = {}
        predicted: dict[int, tuple[str | None, str]] = {}
        for row, q in enumerate(result.ok_indices):
            why = "the model has no classifier" if result.probabilities is None else \
                "the index has no categories" if not gallery.labelled else ""
            name = None
            if not why:
                name = names[int(np.argmax(result.probabilities[row]))]
                if name not in known:
                    why, name = f"no item of the index has the predicted category {name!r}", None
            predicted[int(q)] = (name, why)
            groups.setdefault(name, []).append(row)
        records: list[dict | None] = [None] * len(items)
        for name, rows in groups.items():
            rows_arr = np.asarray(rows, dtype=np.int64)
            sub_items = [items[int(result.ok_indices[r])] for r in rows]
            sub = search_records(
                gallery, sub_items, result.embeddings[rows_arr], np.arange(len(rows)), [], k,
                category_names=self.metadata.category_names,
                probabilities=None if result.probabilities is None else result.probabilities[rows_arr],
                categories=None if name is None else [name], match="any")
            for r, rec in zip(rows, sub):
                q = int(result.ok_indices[r])
                rec["query"] = query_name(items[q], q)
                rec["category_filter"] = None if name is None else [name]
                rec["category_filter_source"] = "model" if name is not None else predicted[q][1]
                records[q] = rec
        for err in result.errors:
            records[err.index] = {"query": query_name(items[err.index], err.index), "results": [],
                                  "predicted_categories": [], "error": err.message,
                                  **garment_query_fields(items[err.index])}
        return records  # type: ignore[return-value]

    def evaluate_garments(self, kaggle_root, k: int = 10, *, options=None, baseline_samples: int = 5,
                          seed: int = 0) -> dict:
        """Leave-one-photo-out retrieval over the garments of a labelled Kaggle folder (see
        `evaluate.evaluate_garment_embeddings`)."""
        from imat.engine.evaluate import evaluate_garment_embeddings

        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        gs, crops = self.garment_items(kaggle_root, options)
        result = self.embed_result(crops, desc="evaluating garments")
        garments = [gs.garments[int(i)] for i in result.ok_indices]
        labels = np.stack([gs.labels.categories_to_multihot([g.category_id]) for g in garments])
        attributes = np.stack([gs.labels.attributes_to_multihot(g.attribute_ids) for g in garments])
        probabilities = None
        if result.probabilities is not None:
            probabilities = self._probabilities_in(gs.labels.category_names, result.probabilities)
        out = evaluate_garment_embeddings(
            result.embeddings, labels, [g.image_id for g in garments], k,
            attributes=attributes if attributes.any() else None, probabilities=probabilities,
            baseline_samples=baseline_samples, seed=seed)
        out.update({
            "root": str(kaggle_root),
            "model": str(self.model_path),
            "garment_model": self.is_garment_model,
            "garment_padding": self.garment_padding,
            "garments": len(gs.garments),
            "garment_counts": gs.counts(),
            "skipped_images": [str(e) for e in result.errors],
            "images_per_s": result.timings.images_per_s,
        })
        return out


__all__ = ["EmbedError", "Engine", "default_item_id", "item_label"]
