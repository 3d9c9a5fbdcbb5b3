"""Export an imat model (or a training run's checkpoint) to one self-contained model.onnx.

The file takes uint8 NHWC images ``images [batch, S, S, 3]`` (normalisation is inside the
graph) and gives ``embedding [batch, D]`` (L2-normalised) and, for models whose objective
trains the classifier (bce), ``probabilities [batch, C]`` = sigmoid(logits).

Which output is exported as ``embedding`` (recorded as ``embedding_source``) and whether
``probabilities`` are exported come from the objective's spec (``imat.train_jax.objectives``),
or from the run's ``--embedding-source``: always something the objective trained. The sources:
- ``embedding``: the embedding head (Dense on the pooled features, then L2 normalisation);
- ``pooled``: the backbone's pooled features, L2-normalised (``embedding_dim`` is then the
  backbone width, 512 for ResNet18, ...);
- ``probabilities``: the classifier's sigmoid probabilities, L2-normalised.
An objective that does not train the classifier exports no ``probabilities``.

Nothing reaches ``out_path`` unless the graph passes ``onnx.checker`` (full check) and the
parity gate (``validate.check_parity``: ONNX Runtime vs the JAX model on the same images);
the file is written to a temp file beside the target and ``os.replace``d into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import onnx

from imat import __version__, contract
from imat.constants import RESIZE_MODES
from imat.errors import ConfigError, ModelError
from imat.export import validate as parity
from imat.export.graph import GraphBuilder
from imat.export.translate import build_backbone, normalized_embedding
from imat.fileio import atomic_path
from imat.train_jax.objectives import get_objective

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
NUM_RANDOM_IMAGES = 6


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What an export did: where, how well (parity), how long, how big."""

    path: pathlib.Path
    outputs: tuple[str, ...]
    fingerprint: str
    size_bytes: int
    seconds: dict[str, float]
    parity: parity.ParityReport | None


def export_onnx(model, out_path, **options) -> pathlib.Path:
    """Export ``model`` to ``out_path`` (one .onnx file, dynamic batch) and return the path.

    Keywords as ``export_onnx_report`` (``image_size``, ``objective``, ``category_names`` are
    required), which also returns the parity errors, timings and file size.
    """
    return export_onnx_report(model, out_path, **options).path


def export_onnx_report(
    model,
    out_path,
    *,
    image_size: int,
    objective: str,
    resize_mode: str = "stretch",
    embedding_source: str | None = None,
    category_names: Sequence[str],
    extra_metadata: dict | None = None,
    validate: bool = True,
    include_logits: bool = False,
    tolerance: float = parity.DEFAULT_TOLERANCE,
    validation_images: np.ndarray | None = None,
    fold_batchnorm: bool = True,
) -> ExportReport:
    """Export ``model`` to ``out_path``; returns the parity errors, timings and file size.

    ``include_logits`` adds the raw classifier ``logits`` output (used to compare with
    torchvision). ``validation_images`` (uint8 [N, S, S, 3], e.g. real photos) are compared in
    the parity gate in addition to random images. ``fold_batchnorm=False`` keeps explicit
    BatchNormalization nodes instead of folding them into the convs. ``embedding_source``
    (default: the objective's) must be an output the objective trains. ``extra_metadata`` values
    that are not strings are stored as JSON. The file is written to a temp name, checked
    (checker, parity gate) and only then renamed into place.
    """
    t0 = time.perf_counter()
    out_path = pathlib.Path(out_path)
    image_size = _check_options(resize_mode, image_size, out_path)
    embedding_source = served_output(objective, embedding_source)
    with_probabilities = get_objective(objective).exports_probabilities
    category_names = [str(n) for n in category_names]

    g = GraphBuilder(fold_bn=fold_batchnorm)
    tensors = build_backbone(g, model, image_size)
    probabilities = None
    if with_probabilities or include_logits or embedding_source == "probabilities":
        if tensors.logits is None:
            raise ModelError(f"{type(model).__name__} has no classifier head, so it has no probabilities/logits")
        num_classes = int(g.shape(tensors.logits)[1])
        if with_probabilities and len(category_names) != num_classes:
            raise ConfigError(
                f"category_names has {len(category_names)} names but the model's classifier has "
                f"{num_classes} outputs; pass one name per class"
            )
        probabilities = g.sigmoid(tensors.logits, name="probabilities_sigmoid")
    outputs: list[str] = []
    if embedding_source == "embedding":
        g.add_output(tensors.embedding, "embedding")
    else:
        source = tensors.pooled if embedding_source == "pooled" else probabilities
        g.add_output(normalized_embedding(g, source, embedding_source), "embedding")
    outputs.append("embedding")
    embedding_dim = int(g.shape("embedding")[1])
    if with_probabilities:
        g.add_output(probabilities, "probabilities")
        outputs.append("probabilities")
    if include_logits:
        g.add_output(tensors.logits, "logits")
        outputs.append("logits")
    fingerprint = g.fingerprint()
    metadata = contract.metadata_props(
        architecture=str(getattr(model, "arch", type(model).__name__)), objective=objective, image_size=image_size,
        resize_mode=resize_mode, embedding_dim=embedding_dim, category_names=category_names, fingerprint=fingerprint,
        outputs=outputs, embedding_source=embedding_source, model_config=getattr(model, "config", None),
        extra=extra_metadata,
    )
    proto = g.build(f"imat_{metadata['architecture']}", metadata)
    proto.producer_version = __version__
    proto.doc_string = (
        f"imat {metadata['architecture']} ({objective}, {image_size} px, {resize_mode}): "
        f"images uint8 [batch, {image_size}, {image_size}, 3] -> {', '.join(outputs)}"
    )
    t_build = time.perf_counter()

    check_model_proto(proto)
    t_check = time.perf_counter()

    report = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write the model to {out_path}: {e.strerror or e}; choose another --out") from e
    with atomic_path(out_path) as tmp:  # renamed into place only if every check below passes
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        t_write = time.perf_counter()
        if validate:
            images = validate_images(image_size, validation_images)
            report = check_parity_jax(tmp, model, embedding_source, outputs, images, tolerance=tolerance,
                                      display_path=out_path)
        t_validate = time.perf_counter()
    seconds = {
        "build": t_build - t0, "check": t_check - t_build, "write": t_write - t_check,
        "validate": t_validate - t_write, "total": time.perf_counter() - t0,
    }
    size = out_path.stat().st_size
    logger.info(
        "exported %s (%s, %s, outputs %s, %.1f MB) in %.1f s%s", out_path, metadata["architecture"], objective,
        outputs, size / 1e6, seconds["total"], f"; parity {report.describe()}" if report else " (not validated)",
    )
    return ExportReport(out_path, tuple(outputs), fingerprint, size, seconds, report)


def served_output(objective: str, embedding_source: str | None = None) -> str:
    """The model output exported as ``embedding``: ``embedding_source`` or the objective's default;
    ConfigError for an unknown objective or an output the objective does not train."""
    spec = get_objective(objective)
    source = embedding_source or spec.embedding_source
    if source not in spec.trains:
        raise ConfigError(f"embedding source {source!r} is not trained by objective {objective!r} "
                          f"(it trains {', '.join(sorted(spec.trains))})")
    return source


def _check_options(resize_mode: str, image_size, out_path: pathlib.Path) -> int:
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    try:
        size = int(image_size)
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be an integer, got {image_size!r}") from None
    if size < 8:
        raise ConfigError(f"image_size {size} is too small to export (need >= 8 pixels)")
    if out_path.exists() and out_path.is_dir():
        raise ConfigError(f"--out {out_path} is a directory; give a file path such as {out_path / 'model.onnx'}")
    return size


def check_model_proto(proto: onnx.ModelProto) -> None:
    """onnx.checker full check (includes strict shape inference); ModelError when it fails."""
    size = proto.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise ModelError(f"the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"the exported ONNX graph is invalid (exporter bug): {e}") from e


def validate_images(image_size: int, extra: np.ndarray | None) -> np.ndarray:
    """Random images (with black/white extremes) plus any real images given."""
    images = parity.random_images(NUM_RANDOM_IMAGES, image_size)
    if extra is None or len(extra) == 0:
        return images
    extra = np.asarray(extra)
    if extra.dtype != np.uint8 or extra.ndim != 4 or extra.shape[1:] != (image_size, image_size, 3):
        raise ConfigError(
            f"validation images must be uint8 [N, {image_size}, {image_size}, 3], got {extra.dtype} {extra.shape}"
        )
    return np.concatenate([extra, images])


def jax_reference(model, embedding_source: str, outputs: Sequence[str]):
    """images uint8 -> {output: array} computed by the JAX model (eval mode, on a clone)."""
    import jax
    from flax import nnx

    from imat.train_jax.evaluation import retrieval_outputs
    from imat.train_jax.models.heads import l2_normalize

    ref = nnx.clone(model)
    ref.eval()  # BatchNorm running averages, no dropout; the caller's model keeps its mode

    @nnx.jit
    def forward(m, images):
        out = m(images)
        source = retrieval_outputs(out)[embedding_source]
        res = {"embedding": source if embedding_source == "embedding" else l2_normalize(source)}
        if "probabilities" in outputs or "logits" in outputs:
            # logits also give the probabilities' error scale (validate.compare)
            res["logits"] = out["logits"]
        if "probabilities" in outputs:
            res["probabilities"] = jax.nn.sigmoid(out["logits"])
        return res

    return lambda images: {k: np.asarray(v) for k, v in forward(ref, images).items()}


def check_parity_jax(path, model, embedding_source: str, outputs: Sequence[str], images: np.ndarray, *,
                     tolerance: float = parity.DEFAULT_TOLERANCE, display_path=None) -> parity.ParityReport:
    """The parity gate for an imat model: ``path`` (ONNX Runtime) vs ``model`` (JAX, eval mode)."""
    return parity.check_parity(path, jax_reference(model, embedding_source, outputs), outputs, images,
                               tolerance=tolerance, display_path=display_path)


def read_metadata(path) -> contract.ModelMetadata:
    """The validated metadata of a model.onnx file (`imat.contract.parse_metadata`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError family
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from e
    return contract.parse_metadata({p.key: p.value for p in proto.metadata_props}, path)


# ---- runs --------------------------------------------------------------------------------

CALIBRATION_IMAGES = 128  # training images that set the int8 activation ranges
HELDOUT_IMAGES = 256  # at most this many validation images for the int8 agreement gate


def int8_path(out_path) -> pathlib.Path:
    """Where `--quantize int8` writes the int8 model beside the float one: model.onnx -> model.int8.onnx."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f"{out_path.stem}.int8{out_path.suffix or '.onnx'}")


def quantize_run(run_dir, float_model, out_path, *, calibration_images: int = CALIBRATION_IMAGES,
                 min_overlap: float | None = None):
    """The int8 model of a run's exported float model: calibrated on the run's prepared training images,
    gated on its validation images (`imat.export.quantize`); ModelError (nothing written) when refused."""
    from imat.data_tools.prepared import PreparedSplit
    from imat.export import quantize

    run_dir = pathlib.Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    data_dir = config.get("data_dir")
    if not data_dir or not pathlib.Path(data_dir).exists():
        raise ModelError(f"--quantize int8 calibrates on the run's prepared dataset, but {run_dir / 'config.json'} "
                         f"names {data_dir!r}, which is not there; prepare it again (imat data prepare) at that path")
    train = PreparedSplit.open(data_dir, "train", cache=False)
    heldout = PreparedSplit.open(data_dir, "validation", cache=False)
    rng = np.random.default_rng(0)

    def sample(split, count):
        idx = np.sort(rng.choice(split.num_examples, min(count, split.num_examples), replace=False))
        return np.asarray(split.images(idx.tolist()))

    logger.info("int8: calibrating on %d training images, gate on %d held-out images of %s",
                min(calibration_images, train.num_examples), min(HELDOUT_IMAGES, heldout.num_examples), data_dir)
    kwargs = {} if min_overlap is None else {"min_overlap": min_overlap}
    return quantize.quantize_int8(float_model, out_path, sample(train, calibration_images),
                                  sample(heldout, HELDOUT_IMAGES), **kwargs)


def export_run(run_dir, out_path, step: int | None = None) -> pathlib.Path:
    """Export the checkpoint of a training run (latest step unless ``step``) to ``out_path``."""
    return export_run_report(run_dir, out_path, step=step).path


def export_run_report(run_dir, out_path, step: int | None = None, *, tolerance: float = parity.DEFAULT_TOLERANCE,
                      include_logits: bool = False) -> ExportReport:
    from imat.train_jax.checkpoint import load_model_from_run

    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"run directory {run_dir} does not exist; pass the workdir given to `imat train`")
    check_run_health(run_dir)
    model, config = load_model_from_run(run_dir, step=step)
    for key in ("objective", "image_size"):
        if key not in config:
            raise ModelError(f"{run_dir / 'config.json'} has no {key!r}; is this an imat training run?")
    objective = config["objective"]
    image_size = int(config["image_size"])
    extra = {"source_run": run_dir.resolve().name}
    restored_step = config.get("checkpoint_step", step)
    if restored_step is not None:
        extra["checkpoint_step"] = str(int(restored_step))
    split = _prepared_split(config)
    if split is not None and getattr(split, "garments", False):   # the engine crops garments for this model
        extra.update({"garment_model": "true", "garment_padding": json.dumps(split.garment_padding)})
    return export_onnx_report(
        model, out_path, image_size=image_size, objective=objective, resize_mode=_run_resize_mode(run_dir, config, split),
        embedding_source=config.get("embedding_source") or config.get("retrieval_output"), category_names=_category_names(config, split),
        extra_metadata=extra, validate=True, include_logits=include_logits, tolerance=tolerance,
        validation_images=_run_images(split, image_size),
    )


def check_run_health(run_dir: pathlib.Path) -> None:
    """ModelError when the run's logged losses show it diverged (``train_jax.divergence``): such a
    model would serve garbage, whatever its parity."""
    from imat.train_jax.divergence import divergence
    from imat.train_jax.run_log import read_rows

    path = run_dir / "metrics.jsonl"
    rows = [r for r in read_rows(path) if isinstance(r.get("loss"), (int, float))]
    train = [float(r["loss"]) for r in rows if r.get("split") == "train"]
    val = [float(r["loss"]) for r in rows if r.get("split") == "val"]
    why = divergence(train)
    if why is None and val and train:
        why = divergence([train[0], *val[-1:] * 3])  # the last evaluation alone, against the healthy start
    if why:
        raise ModelError(f"{run_dir} diverged in training ({why}; see {path}); not exporting it: retrain with "
                         "a lower --lr")


def _prepared_split(config: dict):
    """The run's validation split (labels in RAM, images read on demand), when the dataset is still there."""
    data_dir = config.get("data_dir")
    if not data_dir or not pathlib.Path(data_dir).exists():
        return None
    from imat.data_tools.prepared import PreparedSplit

    try:
        return PreparedSplit.open(data_dir, "validation", cache=False)
    except Exception as e:  # moved or damaged: export still works from the run alone
        logger.warning("cannot read the run's prepared dataset %s (%s)", data_dir, e)
        return None


def _run_resize_mode(run_dir: pathlib.Path, config: dict, split) -> str:
    """The resize mode training saw: the run's record, else (runs before imat recorded it) the dataset's."""
    mode = config.get("resize_mode") or (split.resize_mode if split is not None else None)
    if mode is None:
        logger.warning("%s records no resize mode and its dataset is gone; assuming 'stretch'", run_dir)
        return "stretch"
    return mode


def _category_names(config: dict, split) -> list[str]:
    from imat.data_tools.labels import LabelSpace

    path = split.data_dir / "label_descriptions.json" if split is not None else None
    labels = LabelSpace.from_json(path) if path is not None and path.is_file() else LabelSpace.default()
    names = list(labels.category_names)
    num_classes = int(config.get("num_classes", len(names)))
    if num_classes != len(names):
        # A classifier that is not over the 46 categories: name classes by index.
        logger.warning("run has %d classes but the label space has %d names; naming classes by index",
                       num_classes, len(names))
        names = [str(i) for i in range(num_classes)]
    return names


def _run_images(split, image_size: int, count: int = 8) -> np.ndarray | None:
    """A few real validation images of the run's dataset for the parity gate, when it is there."""
    if split is None or split.image_size != image_size or split.num_examples == 0:
        return None
    n = min(count, split.num_examples)
    logger.info("parity check uses %d real images from %s", n, split.data_dir)
    return np.asarray(split.images(list(range(n))))
