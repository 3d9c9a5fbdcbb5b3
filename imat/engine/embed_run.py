"""`imat embed`: a folder of images -> an embeddings folder (imat.engine.embedding_parts), resumable.

The input list and its records (ids, paths, labels) are made here, on the driver, for every
backend; a backend only turns the pending parts into embeddings and errors (`PartOutput`s, in
any order). `local_backend` runs them in this process (the engine's decode pool + ONNX Runtime);
`imat.scale.ray_embed.ray_backend` runs them on Ray Data. The parts on disk are the same.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from imat.engine.embedder import _progress as progress_bar
from imat.engine.embedding_parts import EmbeddingDirWriter, PartOutput, PartPlan, open_for_writing
from imat.engine.index_dir import model_fields

logger = logging.getLogger(__name__)

# backend(items, pending parts, progress bar) -> the parts' outputs, in any order, each part once
Backend = Callable[[Sequence, Sequence[PartPlan], object], Iterable[PartOutput]]


@dataclasses.dataclass
class EmbedInputs:
    """What to embed: the items (paths) and their records; `labelled` when the folder had labels."""

    items: list
    records: list[dict]
    labelled: bool
    folder: object = None  # the FolderItems it came from (skipped names, problems), when from a folder


def folder_inputs(engine, images) -> EmbedInputs:
    """The images of a plain or Kaggle folder (imat.engine.gallery) as embed inputs, records made by the engine."""
    from imat.engine.gallery import folder_items

    found = folder_items(images)
    items = list(found.items)
    records = engine.item_records(items, range(len(items)), found.ids, found.labels)
    return EmbedInputs(items=items, records=records, labelled=found.labelled, folder=found)


@dataclasses.dataclass
class EmbedRunSummary:
    directory: pathlib.Path
    backend: str
    parts: int
    skipped_parts: int  # complete from an earlier run
    redone_parts: int  # partial (a killed run's files) and written again
    written_parts: int
    items: int  # input items of the parts written in this run
    embedded: int
    errors: list[tuple[str, str]]  # (path, why) of the items skipped in this run
    wall_s: float
    resume_note: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.items / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        if not self.written_parts:
            return f"{self.directory}: all {self.parts} parts already complete; nothing to embed"
        return (f"embedded {self.embedded} of {self.items} images into {self.directory} "
                f"({self.written_parts} parts written, {self.skipped_parts} already complete, "
                f"{self.parts} in all; {len(self.errors)} skipped) at {self.images_per_s:.1f} images/s "
                f"[{self.backend}]")


def local_backend(engine) -> Backend:
    """Embed each pending part in this process, one after the other (the engine's decode pool overlaps the model)."""
    def run(items: Sequence, pending: Sequence[PartPlan], bar) -> Iterator[PartOutput]:
        for plan in pending:
            result = engine.embed_result(items[plan.start:plan.stop], bar=bar)
            yield PartOutput(plan.index, result.embeddings, {e.index: e.message for e in result.errors})

    return run




def embed_to_dir(engine, inputs: EmbedInputs, out, *, part_size: int | None = None, backend: Backend | None = None,
                 backend_name: str = "local", progress: bool | None = None,
                 on_open: Callable[[EmbeddingDirWriter], None] | None = None) -> EmbedRunSummary:
    """Write (or finish) the embeddings folder `out` for `inputs`; parts already complete are skipped.

    `on_open(writer)` is called once the folder is open and its pending parts known (the CLI says
    what a rerun found there).
    """
    out = pathlib.Path(out)
    backend = backend or local_backend(engine)
    start = time.perf_counter()
    with open_for_writing(out, inputs.records, model=model_fields(engine.metadata),
                          dim=engine.metadata.embedding_dim, part_size=part_size,
                          labelled=inputs.labelled) as writer:
        if on_open is not None:
            on_open(writer)
        pending = {p.index: p for p in writer.pending}
        summary = EmbedRunSummary(directory=out, backend=backend_name, parts=writer.manifest["counts"]["parts"],
                                  skipped_parts=len(writer.skipped),
                                  redone_parts=sum(p.status == "partial" for p in writer.pending), written_parts=0,
                                  items=0, embedded=0, errors=[], wall_s=0.0, resume_note=writer.resume_note())
        with progress_bar(sum(p.rows for p in writer.pending), "embedding", progress) as bar:
            for output in backend(inputs.items, writer.pending, bar) if pending else ():
                plan = pending.pop(output.index, None)
                if plan is None:
                    raise RuntimeError(f"backend {backend_name} returned part {output.index} twice or unasked")
                entry = writer.write_part(output)
                summary.written_parts += 1
                summary.items += entry["rows"]
                summary.embedded += entry["embedded"]
                summary.errors += [(inputs.records[plan.start + pos].get("path") or inputs.records[plan.start + pos]
                                    ["id"], why) for pos, why in sorted(output.errors.items())]
        if pending:
            raise RuntimeError(f"backend {backend_name} did not return parts {sorted(pending)[:5]}")
    summary.wall_s = time.perf_counter() - start
    logger.info("%s", summary.line())
    return summary
