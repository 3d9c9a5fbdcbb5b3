"""`imat embed --ray`: the pending parts of an embeddings folder, embedded on Ray Data.

    read_binary_files(paths)                       the files' bytes, read by Ray tasks
      -> map_batches(decode_batch)                 CPU tasks (not fused into the actors): imat's
                                                   own decoder (data_tools.images), the pixels and error
                                                   reasons of the single-process path
      -> map_batches(EmbedActor, concurrency=N)    N actors, one ONNX Runtime session each (GPU when asked)
      -> iter_batches on the driver                rows routed to their part; each part, once whole, is
                                                   yielded to imat.engine.embed_run, which writes it

The driver keeps the input list and writes every file, so the folder (and its resume logic) is the
one of the single-process path; Ray moves only bytes, pixels and embeddings. On a cluster the image
files and the model must be readable at the same paths on every node (shared storage), and imat
must be installed there. A local Ray is started when none is running and no address is given, and
shut down afterwards; a Ray already initialised (by the caller) is used as it is.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from imat.engine.embedder import DECODE_ERRORS, error_message
from imat.engine.embedding_parts import PartOutput, PartPlan
from imat.errors import ConfigError

logger = logging.getLogger(__name__)

# CPUs a decode task asks for. Half: a decode task also waits on reading its files. And unlike the
# actors' whole CPUs, so Ray Data keeps decoding in tasks of its own, spread over the CPUs the actors
# leave free (with equal resources it fuses the step into the actors: one decoding thread per actor).
DECODE_TASK_CPUS = 0.5


def ray_module():
    """ray (with ray.data); ConfigError saying what to install when it is missing."""
    try:
        import ray
        import ray.data
    except ModuleNotFoundError:
        raise ConfigError("--ray needs the Python package 'ray' with Ray Data, which is not installed; "
                          "pip install 'imat[scale]'") from None
    return ray


def decode_batch(batch: dict, size: int, mode: str) -> dict:
    """Ray Data batch {"bytes", "path"} -> {"path", "image" uint8[B,size,size,3], "error" ("" when decoded)}."""
    from imat.data_tools.images import decode_file_bytes

    paths = batch["path"]
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for i, (data, path) in enumerate(zip(batch["bytes"], paths)):
        try:
            images[i] = decode_file_bytes(data, str(path), size, mode)
        except DECODE_ERRORS as e:
            errors[i] = error_message(e)
    return {"path": paths, "image": images, "error": errors}


class EmbedActor:
    """A Ray actor holding one ONNX Runtime session (built once); embeds the decoded rows of each batch."""

    def __init__(self, model_path: str, fingerprint: str, threads: int, use_gpu: bool):
        from imat.engine.session import ModelSession

        providers = ["CUDAExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
        # decode_threads=1: the actor shares cores with the decode tasks, so ORT must not spin.
        self.session = ModelSession(model_path, providers=providers, intra_op_threads=threads, decode_threads=1)
        if self.session.metadata.fingerprint != fingerprint:
            raise ConfigError(f"{model_path}: on this Ray node the model has fingerprint "
                              f"{self.session.metadata.fingerprint[:12]}, the driver's {fingerprint[:12]}; "
                              "every node must see the same model file")
        self.dim = self.session.metadata.embedding_dim

    def __call__(self, batch: dict) -> dict:
        ok = batch["error"] == ""
        embeddings = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            embeddings[ok] = self.session.run(batch["image"][ok])["embedding"]
        return {"path": batch["path"], "embedding": embeddings, "error": batch["error"]}


def _input_paths(items: Sequence, pending: Sequence[PartPlan]) -> dict[str, tuple[int, int]]:
    """{absolute path: (pending part number, position in it)} of the items of the pending parts."""
    where: dict[str, tuple[int, int]] = {}
    for k, plan in enumerate(pending):
        for pos in range(plan.rows):
            item = items[plan.start + pos]
            if not isinstance(item, (str, os.PathLike)):
                raise ConfigError(f"--ray embeds image files; item {plan.start + pos} is {type(item).__name__}")
            path = os.path.abspath(os.fspath(item))
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{path!r}: Ray reads file names as UTF-8 and this one is not; rename it or "
                                  "embed without --ray") from None
            if path in where:
                raise ConfigError(f"{path}: listed twice in the input; Ray returns rows by path, so each file once")
            where[path] = (k, pos)
    return where


class _PartBuffer:
    """The rows of one part as they arrive, in any order."""

    def __init__(self, plan: PartPlan, dim: int):
        self.plan = plan
        self.vectors = np.zeros((plan.rows, dim), np.float32)
        self.errors: dict[int, str] = {}
        self.seen = np.zeros(plan.rows, dtype=bool)

    def put(self, pos: int, vector: np.ndarray, error: str) -> None:
        if self.seen[pos]:
            raise RuntimeError(f"Ray returned row {self.plan.start + pos} twice")
        self.seen[pos] = True
        if error:
            self.errors[pos] = error
        else:
            self.vectors[pos] = vector

    @property
    def whole(self) -> bool:
        return bool(self.seen.all())

    def output(self) -> PartOutput:
        keep = np.ones(self.plan.rows, dtype=bool)
        keep[list(self.errors)] = False
        return PartOutput(self.plan.index, self.vectors[keep], dict(self.errors))


def _start_ray(ray, address: str | None, actors: int, cpus_per_actor: int) -> bool:
    """Initialise Ray unless it already is; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:
        # Logical CPUs for a local Ray: the actors hold theirs for the whole run, and the read and
        # decode tasks need some left over, or they would wait for the actors forever.
        kwargs["num_cpus"] = max(os.cpu_count() or 1, actors * cpus_per_actor + 2)
    ray.init(address=address, **kwargs)
    return True


def ray_backend(engine, *, address: str | None = None, actors: int = 2, gpus_per_actor: float = 0.0,
                cpus_per_actor: int = 1, batch_size: int | None = None):
    """An embed_run backend running the pending parts on Ray Data (see the module docstring)."""
    if actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {actors}")
    if int(cpus_per_actor) != cpus_per_actor or cpus_per_actor < 1:
        raise ConfigError(f"CPUs per actor must be a whole number >= 1 (its ONNX Runtime threads), got {cpus_per_actor}")
    if gpus_per_actor < 0:
        raise ConfigError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    meta = engine.metadata
    model_path = str(pathlib.Path(engine.model_path).resolve())
    batch = batch_size or engine.batch_size

    def run(items: Sequence, pending: Sequence[PartPlan], bar) -> Iterator[PartOutput]:
        ray = ray_module()
        where = _input_paths(items, pending)
        started = _start_ray(ray, address, actors, cpus_per_actor)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # imat's own bar counts images
            ds = ray.data.read_binary_files(list(where), include_paths=True)
            ds = ds.map_batches(decode_batch, fn_kwargs={"size": meta.image_size, "mode": meta.resize_mode},
                                batch_size=batch, batch_format="numpy", num_cpus=DECODE_TASK_CPUS)
            ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={
                "model_path": model_path, "fingerprint": meta.fingerprint,
                "threads": int(cpus_per_actor), "use_gpu": gpus_per_actor > 0},
                compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch, batch_format="numpy",
                num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None)
            buffers: dict[int, _PartBuffer] = {}
            for out in ds.iter_batches(batch_format="numpy", batch_size=None):
                for path, vector, error in zip(out["path"], out["embedding"], out["error"]):
                    try:
                        k, pos = where[str(path)]
                    except KeyError:
                        raise RuntimeError(f"Ray returned a row for {path!r}, which is not in the input") from None
                    buffer = buffers.get(k) or buffers.setdefault(k, _PartBuffer(pending[k], meta.embedding_dim))
                    buffer.put(pos, vector, str(error))
                    if buffer.whole:
                        yield buffer.output()
                        del buffers[k]
                bar.update(len(out["path"]))
            if buffers:
                raise RuntimeError(f"Ray returned parts {sorted(pending[k].index for k in buffers)[:5]} incompletely")
        finally:
            if started:
                ray.shutdown()

    return run
