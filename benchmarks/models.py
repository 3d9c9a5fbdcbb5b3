"""Forward images/s of every imat backbone under jax.jit (eval mode), with the depthwise conv as
XLA's grouped convolution and as imat's shifted multiply-adds, measured in the same run.

    python benchmarks/models.py [--batch 32] [--size 128] [--repeats 5] [--models mobilenet_v2,resnet18]

MobileNetV2 is timed with both formulations (the ratio is shifted / grouped); the ResNets have no
depthwise convs, so they are timed once. Compile time is reported separately and excluded from
images/s (median over ``repeats`` timed calls after one warm-up). The two MobileNetV2 variants
share their weights and the script checks that their outputs agree before printing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import statistics
import time

import jax
import numpy as np
from flax import nnx

from imat.train_jax.models import MODELS, create_model, set_depthwise
from imat.train_jax.models.layers import set_conv_impl


def time_forward(model, images: np.ndarray, repeats: int) -> tuple[float, float, np.ndarray]:
    """(compile+first call seconds, median images/s, logits) of a jitted eval-mode forward."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)["logits"])
    x = jax.device_put(images)
    t = time.perf_counter()
    out = jax.block_until_ready(fn(state, x))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(state, x))
        times.append(time.perf_counter() - t)
    return compile_s, len(images) / statistics.median(times), np.asarray(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="mobilenet_v2,resnet18,resnet34,resnet50",
                    help=f"comma-separated subset of {sorted(MODELS)}")
    ap.add_argument("--train-size", type=int, default=64,
                    help="also time the resnet18 train step at this size, standard convs vs imat's CPU "
                         "tap formulation for tiny feature maps (0: skip)")
    args = ap.parse_args(argv)

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    print(f"backend={jax.default_backend()} devices={jax.devices()} batch={args.batch} size={args.size} "
          f"repeats={args.repeats}")
    print(f"{'model':<14}{'grouped img/s':>15}{'shifted img/s':>15}{'ratio':>8}{'compile g/s (s)':>18}")
    for name in args.models.split(","):
        model = create_model(name, num_classes=46, depthwise="grouped", rngs=nnx.Rngs(0))
        model.eval()
        c1, ips1, out1 = time_forward(model, images, args.repeats)
        if name != "mobilenet_v2":
            print(f"{name:<14}{ips1:>15.1f}{'-':>15}{'-':>8}{c1:>18.1f}")
            continue
        set_depthwise(model, "shifted")
        c2, ips2, out2 = time_forward(model, images, args.repeats)
        err = np.abs(out1 - out2).max() / max(np.abs(out1).max(), 1e-30)
        assert err <= 1e-4, f"grouped and shifted outputs differ (rel err {err:.2e})"
        print(f"{name:<14}{ips1:>15.1f}{ips2:>15.1f}{ips2 / ips1:>7.1f}x{c1:>10.1f} / {c2:.1f}"
              f"   (outputs agree, rel err {err:.1e})")

    if args.train_size:
        # At 64 px ResNet's layer4 runs on 2x2 maps, where XLA:CPU's convolution is ~100x slow.
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from common import train_step_rate

        rates = {
            impl: train_step_rate("resnet18", args.train_size, args.batch, max(2, args.repeats // 2),
                                  configure=lambda m, impl=impl: set_conv_impl(m, impl))[0]
            for impl in ("lax", "auto")
        }
        print(f"\nresnet18 train step {args.train_size}px batch {args.batch}: standard convs {rates['lax']:.1f} img/s, "
              f"auto (tap sums where slow) {rates['auto']:.1f} img/s, ratio {rates['auto'] / rates['lax']:.1f}x")


if __name__ == "__main__":
    main()
