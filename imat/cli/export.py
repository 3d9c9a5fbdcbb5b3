"""`imat export RUN_DIR --out model.onnx`: a training run's checkpoint -> one validated model.onnx.

A thin call into ``imat.export.onnx_export.export_run_report``; the export always runs the
parity gate (ONNX Runtime vs JAX) and writes nothing when it fails.
"""

from __future__ import annotations

import logging
import pathlib

import click

logger = logging.getLogger(__name__)


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=pathlib.Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Where to write the model (default: RUN_DIR/model.onnx).")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Checkpoint step (default: the latest).")
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True), default=1e-4, show_default=True,
              help="Largest relative error (max |onnx - jax| / max |jax|) the parity gate accepts.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write an int8 model for CPUs (ONNX Runtime static quantization, QDQ, calibrated on the "
                   "run's prepared training images) beside --out as NAME.int8.onnx; refused unless its top-10 "
                   "neighbours on held-out images agree with the float model's (overlap >= 0.9).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --quantize: training images that set the int8 activation ranges.")
def export(run_dir: pathlib.Path, out: pathlib.Path | None, step: int | None, tolerance: float,
           quantize: str | None = None, calibration_images: int = 128) -> None:
    """Export the checkpoint in RUN_DIR to a single ONNX file (uint8 images in; embedding and
    probabilities out), checked against the JAX model before it is written."""
    from imat.export.onnx_export import export_run_report, int8_path, quantize_run

    out = out if out is not None else run_dir / "model.onnx"
    report = export_run_report(run_dir, out, step=step, tolerance=tolerance)
    click.echo(str(report.path))
    if report.parity is not None:
        for name in report.parity.relative:
            click.echo(
                f"  parity {name}: max relative error {report.parity.relative[name]:.2e} "
                f"(max abs {report.parity.absolute[name]:.2e}) over {report.parity.num_images} images"
            )
    click.echo(f"  outputs: {', '.join(report.outputs)}")
    click.echo(f"  export time: {report.seconds['total']:.1f} s (parity check {report.seconds['validate']:.1f} s)")
    click.echo(f"  file size: {report.size_bytes / 1e6:.1f} MB")
    click.echo(f"  fingerprint: {report.fingerprint}")
    if quantize == "int8":
        q = quantize_run(run_dir, report.path, int8_path(report.path), calibration_images=calibration_images)
        click.echo(str(q.path))
        click.echo(f"  int8 agreement: {q.agreement.describe()}")
        click.echo(f"  int8 file size: {q.size_bytes / 1e6:.1f} MB (float {q.float_size_bytes / 1e6:.1f} MB), "
                   f"quantized in {q.seconds:.1f} s from {q.calibration_images} calibration images")
