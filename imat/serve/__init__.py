"""imat.serve: `imat serve`, an HTTP service over imat.engine (FastAPI app under uvicorn, `serve` extra).

    config.py      ServeConfig: every option of `imat serve`, checked
    batcher.py     ModelBatcher: concurrent requests' images run through the model as one batch
    journal.py     the append-only write journal (fsynced before a write is acknowledged)
    live_index.py  LiveIndex: the GalleryIndex behind a lock, its journal, snapshots and thumbnails
    metrics.py     Prometheus text metrics (counters, histograms, gauges), written by hand
    uploads.py     upload size limit, decoding uploads, id and category checks
    app.py         create_app(config): the FastAPI app (endpoints, errors, API key, search page)
    runner.py      serve(config): uvicorn on the app

The engine never imports this package.
"""

from __future__ import annotations

from imat.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig):
    """The FastAPI app for `config` (imported lazily: FastAPI is in the `serve` extra)."""
    from imat.serve.app import create_app as _create_app

    return _create_app(config)
