"""`curves.png`: reward, accuracy, KL and completion length against the RL step."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("train/accuracy", "eval/accuracy")),
    ("KL", ("loss/kl_ref", "loss/approx_kl")),
    ("completion length", ("completion/length_mean",)),
)


def plot_curves(history: Sequence[dict], path: "str | Path", title: str = "") -> None:
    """Draws the four training curves from metric records (one dict per step or evaluation).

    **Arguments:**

    - `history`: records with a `step` key and any of the plotted metrics.
    - `path`: the PNG to write.
    - `title`: figure title.

    **Returns:**

    Nothing.
    """
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
    for ax, (name, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
