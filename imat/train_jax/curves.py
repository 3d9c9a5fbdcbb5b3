"""Training curves: one subplot per metric, train vs validation, written atomically as PNG."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

from imat.fileio import atomic_path

logger = logging.getLogger(__name__)


def plot_curves(rows: list[dict], out_path, metrics: Sequence[str]) -> pathlib.Path | None:
    """Plot train/val rows of metrics.jsonl into ``out_path`` (PNG), one subplot per name in
    ``metrics`` (an objective's ``curve_metrics``); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # the OO API: no global pyplot state, thread-safe

    keys = [k for k in metrics if any(k in r for r in rows)]
    if not keys:
        return None
    fig = Figure(figsize=(4.0 * len(keys), 3.2), constrained_layout=True)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out_path = pathlib.Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return out_path
