"""Loss history of a stage: one row per epoch, written as CSV and plotted as PNG.

A row holds ``epoch`` (1-based), ``train_<term>`` and ``val_<term>`` for each loss term of the
stage (stage1/2: total, reconstruction, kl; stage3: total, the (e1, e2) MSE), the median and
largest L2 norm of the epoch's batch gradients before any clipping (``grad_norm_median``,
``grad_norm_max``; empty in rows written before they were recorded), and ``seconds`` (wall
time of the epoch, validation included). Each term is its per-sample mean over the epoch
(definitions in :mod:`deblend.core.losses`; images normalised as in SPEC 3). Validation runs in eval
mode (z = mu, no dropout), so its KL and reconstruction can be below the training ones.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from deblend.core.atomic import atomic_output


def history_columns(loss_names: Sequence[str]) -> list[str]:
    """CSV header for a stage with these loss terms."""
    return (["epoch"] + [f"train_{name}" for name in loss_names]
            + [f"val_{name}" for name in loss_names]
            + ["grad_norm_median", "grad_norm_max", "seconds"])


def write_history(path: Path, rows: Sequence[dict[str, Any]], loss_names: Sequence[str]) -> None:
    """Write all rows as CSV, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=history_columns(loss_names))
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, float]]:
    """Rows of a history CSV, values as floats (epoch as int; an empty cell as NaN)."""
    with open(path, newline="") as handle:
        return [{k: int(v) if k == "epoch" else float(v or "nan") for k, v in row.items()}
                for row in csv.DictReader(handle)]


def plot_history(path: Path, rows: Sequence[dict[str, Any]], loss_names: Sequence[str],
                 title: str) -> None:
    """One panel per loss term, train and validation against epoch, log scale; atomic PNG."""
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, len(loss_names), figsize=(4 * len(loss_names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], loss_names):
        ax.plot(epochs, [row[f"train_{name}"] for row in rows], "o-", label="train")
        ax.plot(epochs, [row[f"val_{name}"] for row in rows], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        if all(row[f"train_{name}"] > 0 and row[f"val_{name}"] > 0 for row in rows):
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
