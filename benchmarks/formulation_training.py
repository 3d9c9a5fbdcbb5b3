"""The same short training run with XLA's standard convolutions and with imat's CPU formulations:
validation metrics side by side (they must agree within float noise) and wall time.

    imat data prepare ../shared/data/ccp-dev --out DATA --image-size 128
    python benchmarks/formulation_training.py --data DATA [--arch resnet18] [--steps 150]

Both runs use one TrainConfig (BCE, Adam 5e-4, batch 32, seed 0) except ``conv`` ("lax" vs
"auto"), through ``train_and_evaluate``, the trainer ``imat train`` calls. Like the ``imat``
command, the script re-executes itself with glibc's huge-page tunable (``imat.hugepages``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from imat.hugepages import hugepages_status, reexec_with_hugepages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared dataset (imat data prepare)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args(argv)
    if argv is None:
        reexec_with_hugepages([__file__, *sys.argv[1:]])

    from imat.train_jax.config import TrainConfig
    from imat.train_jax.train import train_and_evaluate

    print(hugepages_status())
    rows = {}
    for conv in ("lax", "auto"):
        config = TrainConfig(data_dir=args.data, arch=args.arch, image_size=args.image_size, steps=args.steps,
                             epochs=None, eval_every=args.steps, checkpoint_every=args.steps, conv=conv)
        with tempfile.TemporaryDirectory(prefix=f"imat-formulation-{conv}-") as workdir:
            t = time.perf_counter()
            result = train_and_evaluate(config, workdir)
            rows[conv] = (result, time.perf_counter() - t)
    keys = sorted(k for k, v in rows["lax"][0]["val"].items() if isinstance(v, float))
    print(f"{args.arch} {args.steps} steps at {args.image_size} px, batch 32, seed 0")
    print(f"{'metric':<22}{'lax':>12}{'auto':>12}{'auto - lax':>12}")
    for k in ["loss"] + [k for k in keys if k != "loss"]:
        a, b = rows["lax"][0]["val"].get(k), rows["auto"][0]["val"].get(k)
        if isinstance(a, float) and isinstance(b, float):
            print(f"{'val ' + k:<22}{a:>12.4f}{b:>12.4f}{b - a:>+12.4f}")
    a, b = rows["lax"][0]["train"].get("loss"), rows["auto"][0]["train"].get("loss")
    if a is not None and b is not None:
        print(f"{'train loss (last)':<22}{a:>12.4f}{b:>12.4f}{b - a:>+12.4f}")
    print(f"{'wall s (whole run)':<22}{rows['lax'][1]:>12.0f}{rows['auto'][1]:>12.0f}"
          f"{rows['lax'][1] / rows['auto'][1]:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
