"""`imat serve`: the HTTP service (imat.serve) over a model and an index folder."""

from __future__ import annotations

import logging
import pathlib

import click

logger = logging.getLogger(__name__)


@click.command("serve")
@click.option("--model", "model", required=True, type=click.Path(path_type=pathlib.Path),
              help="model.onnx from `imat export`.")
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=pathlib.Path),
              help="Index folder from `imat index` (changed in place by adds and deletes).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (127.0.0.1: this machine only).")
@click.option("--port", default=8000, show_default=True, help="Port to bind.")
@click.option("--max-batch", default=32, show_default=True, help="Most images in one model call.")
@click.option("--max-wait-ms", default=5.0, show_default=True,
              help="How long a request waits for others to share its model call.")
@click.option("--no-batching", is_flag=True, default=False, help="Run every request as its own model call.")
@click.option("--queue-limit", default=256, show_default=True,
              help="Images waiting for the model before requests get 503.")
@click.option("--max-upload-mb", default=20.0, show_default=True, help="Largest request body.")
@click.option("--max-megapixels", default=64.0, show_default=True,
              help="Uploads with more pixels are refused (decompression-bomb guard).")
@click.option("--max-images", default=16, show_default=True, help="Most images in one search request.")
@click.option("--api-key-file", type=click.Path(path_type=pathlib.Path), default=None,
              help="File whose first line is the API key that writes (adds, deletes) must present.")
@click.option("--protect-reads", is_flag=True, default=False, help="Require the API key for searches and reads too.")
@click.option("--state-dir", type=click.Path(path_type=pathlib.Path), default=None,
              help="Journal and thumbnails of HTTP writes (default: INDEX.serve beside the index).")
@click.option("--snapshot-every", default=100, show_default=True,
              help="Journal entries folded into the index folder at a time.")
@click.option("--threads", "threads", default=2, show_default=True, help="Decoder threads.")
def serve(model, index_dir, host, port, max_batch, max_wait_ms, no_batching, queue_limit, max_upload_mb, max_megapixels, max_images,
          api_key_file, protect_reads, state_dir, snapshot_every, threads):
    """Serve search, add and delete over HTTP, with a search page at /."""
    import importlib.util

    from imat.cli.engine import _quiet_faiss
    from imat.errors import ImatError
    from imat.serve.config import ServeConfig

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImatError(f"`imat serve` needs {', '.join(missing)}, which is not installed; "
                        "install the serve extra: pip install 'imat[serve]'")
    from imat.serve.runner import serve as run_server

    _quiet_faiss()
    config = ServeConfig(model=model, index=index_dir, host=host, port=port, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, batching=not no_batching, queue_limit=queue_limit,
                         max_upload_bytes=int(max_upload_mb * 2**20), max_images=max_images,
                         max_pixels=int(max_megapixels * 1e6),
                         api_key_file=api_key_file, protect_reads=protect_reads, state_dir=state_dir,
                         snapshot_every=snapshot_every, decode_threads=threads)
    click.echo(f"imat serve: {model} over {index_dir} on http://{host}:{port}/ (docs at /docs)", err=True)
    run_server(config, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower())
