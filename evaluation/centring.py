"""Does it matter where training stamps are centred? (issue 22, item 3)

Metadetection cuts each stamp around a detection, whose centroid a neighbour pulls and noise
moves; the networks were trained on stamps centred on the true position. This compares the
regressor's ellipticity error (calibrated, against the clean target's moment labels, pixel frame)
of models trained on either kind of stamp (``simulation.stamp_centre``), on the validation blends
of datasets of either kind drawn from the same config and seed (the same scenes, so the
comparison is paired). Rows split the scenes by whether the detection-centred stamp moved
(``centre_dx``, ``centre_dy`` of a detection-centred dataset).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deblend.core.inference import Deblender
from evaluation.ellipticity import component_stats
from simulation.dataset import StampData, open_dataset

SUBSETS = ("all", "moved", "unmoved")
"""Scenes whose detection-centred stamp moved by >= 1 pixel, the others, and both."""


def moved_mask(data: StampData, indices: np.ndarray) -> np.ndarray | None:
    """(len(indices),) bool: the detection-centred stamp moved, or None for truth-centred data."""
    labels = data.labels()
    if "centre_dx" not in labels:
        return None
    return (labels["centre_dx"][indices] != 0) | (labels["centre_dy"][indices] != 0)


def centring_comparison(runs: Mapping[str, str | Path], datasets: Mapping[str, str | Path], *,
                        device: str = "cpu", views: int = 8, split: str = "validation"
                        ) -> dict[str, Any]:
    """RMSE of e1, e2 of each run's deblender on each dataset's ``split`` blends, per subset
    (:data:`SUBSETS`); the moved scenes are those of the first detection-centred dataset."""
    opened = {name: open_dataset(root) for name, root in datasets.items()}
    indices = {name: data.split_indices(split) for name, data in opened.items()}
    if len({len(i) for i in indices.values()}) != 1:
        raise ValueError("the datasets' splits differ in size: draw them from one config and seed")
    masks = [m for name, data in opened.items()
             if (m := moved_mask(data, indices[name])) is not None]
    if not masks:
        raise ValueError("no dataset is detection-centred (simulation.stamp_centre: detection)")
    moved = masks[0]
    rows = []
    for model_name, run in runs.items():
        model = Deblender.from_run(run, device=device)
        for data_name, data in opened.items():
            idx = indices[data_name]
            e = model.predict(data.images("blend", idx), views=views, reconstruct=False).ellipticity
            labels = data.labels()
            truth = np.stack([labels["e1"][idx], labels["e2"][idx]], axis=1)
            for subset, keep in zip(SUBSETS, (np.ones_like(moved), moved, ~moved)):
                stats = [component_stats(truth[keep, c], e[keep, c]) for c in (0, 1)]
                rows.append({"model": model_name, "data": data_name, "subset": subset,
                             "n": int(keep.sum()), "rmse_e1": stats[0]["rmse"],
                             "rmse_e2": stats[1]["rmse"]})
    return {"split": split, "views": views, "moved_fraction": float(moved.mean()), "rows": rows}


def centring_table(result: Mapping[str, Any]) -> str:
    """The comparison as a markdown table."""
    lines = [f"Regressor RMSE on {result['split']} blends ({result['views']} views); "
             f"{100 * result['moved_fraction']:.1f}% of detection-centred stamps moved",
             "", "| model trained on | stamps | scenes | n | RMSE e1 | RMSE e2 |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['data']} | {row['subset']} | {row['n']} | "
                     f"{row['rmse_e1']:.4f} | {row['rmse_e2']:.4f} |")
    return "\n".join(lines)
