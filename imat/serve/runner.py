"""serve(config): run the app under uvicorn (one process: the index and its journal live in it)."""

from __future__ import annotations

import logging

from imat.serve.config import ServeConfig

logger = logging.getLogger(__name__)


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    import uvicorn

    from imat.serve.app import create_app

    app = create_app(config)  # model, index and journal are loaded here: their errors come before binding
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines%s", config.host,
                       "" if config.api_key_file else "; writes are NOT protected (no --api-key-file)")
    # timeout_graceful_shutdown: a stuck client cannot keep the final snapshot from being written.
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, workers=1,
                timeout_graceful_shutdown=10, server_header=False)
