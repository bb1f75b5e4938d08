"""`curves.png`: reward, accuracy, KL and completion length against the RL step."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("train/accuracy", "eval/accuracy")),
    ("KL", ()),
    ("completion length", ("completion/length_mean",)),
)
# The KL panel's candidates, in order: the first one a run logs with a non-zero value is drawn.
KL_CURVES = (
    ("loss/kl_ref", "KL to the reference (loss/kl_ref)"),
    ("loss/approx_kl", "policy drift within a step, KL to π_old (loss/approx_kl)"),
)


def kl_curve(history: Sequence[dict]) -> tuple[str, str] | None:
    """The KL panel's metric: the KL to the reference when the run keeps one, else the policy's
    drift from π_old within a step, which is 0 with one update per step (then nothing is drawn).

    **Arguments:**

    - `history`: metric records.

    **Returns:**

    `(metric, label)`, or `None` when no candidate has a non-zero value.
    """
    for key, label in KL_CURVES:
        if any(r.get(key, 0) != 0 for r in history):
            return key, label
    return None


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
    kl = kl_curve(history)
    for ax, (name, keys) in zip(axes, PANELS, strict=True):
        labels = dict.fromkeys(keys)
        if name == "KL" and kl is not None:
            labels = {kl[0]: kl[1]}
        for key, label in labels.items():
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                marker = "o" if key.startswith("eval/") else None
                ax.plot(xs, ys, marker=marker, label=label or key)
        if name == "KL" and kl is None:
            ax.text(
                0.5,
                0.5,
                "no reference, one update per step:\nno KL",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
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
