"""ServeConfig: the options of `imat serve`, with safe defaults, checked once at start.

State folder (`state_dir`, default `<index>.serve` beside the index folder): journal.jsonl
(acknowledged writes not yet folded into the index folder) and thumbs/ (thumbnails of items
added over HTTP). It is locked for the server's lifetime, so two servers cannot share it.
"""

from __future__ import annotations

import dataclasses
import pathlib

from imat.errors import ConfigError

MAX_K = 1000


@dataclasses.dataclass
class ServeConfig:
    model: pathlib.Path
    index: pathlib.Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # images per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    batching: bool = True  # False: every request is its own model call (for comparison)
    queue_limit: int = 256  # images waiting for the model; beyond it requests get 503
    max_upload_bytes: int = 20 * 2**20  # one request's body
    max_images: int = 16  # images in one search request
    # decompression-bomb guard for uploads, tighter than the decoder's 200 MP default for local files
    max_pixels: int = 64_000_000
    api_key_file: pathlib.Path | None = None
    protect_reads: bool = False
    state_dir: pathlib.Path | None = None
    snapshot_every: int = 100  # journal entries before they are folded into the index folder
    decode_threads: int = 2
    intra_op_threads: int | None = None
    default_k: int = 10
    thumbnail_px: int = 160

    def __post_init__(self):
        self.model = pathlib.Path(self.model)
        self.index = pathlib.Path(self.index)
        if self.state_dir is None:
            self.state_dir = self.index.parent / f"{self.index.name}.serve"
        self.state_dir = pathlib.Path(self.state_dir)
        if self.api_key_file is not None:
            self.api_key_file = pathlib.Path(self.api_key_file)
        checks = (("--port", self.port, 0, 65535), ("--max-batch", self.max_batch, 1, 4096),
                  ("--queue-limit", self.queue_limit, 1, 10**6), ("--max-images", self.max_images, 1, 1024),
                  ("--snapshot-every", self.snapshot_every, 1, 10**9), ("--decode-threads", self.decode_threads, 1, 256),
                  ("--max-upload-mb", self.max_upload_bytes, 1024, 2**34), ("--k", self.default_k, 1, MAX_K))
        for option, value, low, high in checks:
            if not low <= value <= high:
                raise ConfigError(f"{option} must be between {low} and {high}, got {value}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        if self.protect_reads and self.api_key_file is None:
            raise ConfigError("--protect-reads needs --api-key-file (the key that reads must present)")

    def read_api_key(self) -> str | None:
        """The API key (first line of --api-key-file, stripped), or None when writes are unprotected."""
        if self.api_key_file is None:
            return None
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file {self.api_key_file}: unreadable ({e})") from None
        if not key or len(key[0].strip()) < 16:
            raise ConfigError(f"--api-key-file {self.api_key_file}: the key on its first line must have at least "
                              "16 characters (for example: python -c 'import secrets; print(secrets.token_urlsafe())')")
        return key[0].strip()
