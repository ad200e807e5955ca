"""The last step of stage3: measure the regressor's response on the calibration split.

The fit (:func:`deblend.core.response.fit_response`) runs the finished run's deblender over the
dataset's ``calibration`` samples, which no stage trained on (each with the bands its scene
has: ``simulation.conditions`` may mark some unavailable), and is stored in
``stage3/best.pt`` under ``"response"``; :class:`deblend.Deblender` applies it to every
prediction. It is redone whenever ``best.pt`` lacks it (an interrupted calibration, or a resumed
stage3 that found a new best epoch), and skipped when it is there.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from deblend.core.inference import Deblender
from deblend.core.response import ResponseError, fit_response
from deblend.core.runs import RunLayout, load_checkpoint, save_checkpoint
from simulation.dataset import StampData


def calibrate_regressor(layout: RunLayout, dataset: StampData, device: str,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit and store the response of ``layout``'s stage3 regressor; returns the stored entry.

    The entry is ``{"status": "calibrated", "matrix", "offset", "matrix_err", "n", "scatter",
    "split", "dataset_id"}``, or ``{"status": "uncalibrated", "reason"}`` when the dataset has no
    calibration split or the response is too small to invert (the regressor's raw output is
    then used as it is, and the reason is logged).
    """
    best = layout.best("stage3")
    payload = load_checkpoint(best)
    if "response" in payload:
        return payload["response"]
    indices = dataset.split_indices("calibration")
    entry: dict[str, Any]
    if indices.size == 0:
        entry = {"status": "uncalibrated",
                 "reason": f"{dataset.root} has no calibration split "
                           f"(simulation.calibration_fraction = 0)"}
    else:
        model = Deblender.from_run(layout.root, device=device)
        available = (dataset.conditions()["available"].astype(bool)
                     if dataset.has_conditions else None)
        chunks = [indices[start:start + 512] for start in range(0, len(indices), 512)]
        raw = np.concatenate([
            model.predict(dataset.images("blend", chunk), reconstruct=False,
                          available=None if available is None else available[chunk]
                          ).regressor_output
            for chunk in chunks])
        labels = dataset.labels()
        truth = np.stack([labels["e1"][indices], labels["e2"][indices]], axis=1)
        try:
            response = fit_response(raw, truth)
            entry = {"status": "calibrated", **response.to_dict(), "split": "calibration",
                     "dataset_id": dataset.dataset_id}
        except ResponseError as exc:
            entry = {"status": "uncalibrated", "reason": str(exc)}
    if entry["status"] == "calibrated":
        (r11, r12), (r21, r22) = entry["matrix"]
        log(f"stage3 regressor response on {entry['n']} calibration samples: R = "
            f"[[{r11:.3f}, {r12:.3f}], [{r21:.3f}, {r22:.3f}]], c = "
            f"({entry['offset'][0]:+.4f}, {entry['offset'][1]:+.4f}), scatter "
            f"({entry['scatter'][0]:.4f}, {entry['scatter'][1]:.4f}); predictions are divided "
            f"by it")
    else:
        log(f"WARNING: the stage3 regressor stays uncalibrated: {entry['reason']}")
    payload["response"] = entry
    save_checkpoint(best, payload)
    return entry
