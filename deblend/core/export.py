"""A trained run reduced to what inference needs: the weights of every finished stage.

:func:`export_inference` copies a run's ``run.json`` and, for every stage with a ``best.pt``,
that checkpoint without its optimizer state and history (about a third of the size), marked
finished; the parent and ``uses`` SHA-256 records are rewritten to the exported files, in
lineage order, so that :func:`deblend.core.runs.load_lineage` (and so
:meth:`deblend.core.inference.Deblender.from_run`) accepts the copy as it accepted the run. Each
stage's ``last.pt`` is a symbolic link to its ``best.pt``. The packaged weights
(``deblend/weights/quick``, the default of ``python -m deblend measure``) are such an export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deblend.core.runs import RUN_FILE, RunError, RunLayout, file_sha256, load_checkpoint, \
    save_checkpoint

DROPPED = ("optimizer", "history", "epochs_without_improvement")


def lineage_order(payloads: dict[str, dict]) -> list[str]:
    """Stages ordered so that every parent and used stage comes before its children."""
    order: list[str] = []

    def visit(stage: str, path: tuple[str, ...] = ()) -> None:
        if stage in order:
            return
        if stage in path:
            raise RunError(f"the stages {' '.join(path)} name each other as parents")
        payload = payloads[stage]
        needed = [r["stage"] for r in payload.get("uses") or []]
        if payload.get("parent"):
            needed.append(payload["parent"]["stage"])
        for other in needed:
            if other not in payloads:
                raise RunError(f"{stage} needs {other}, which the run has not finished")
            visit(other, path + (stage,))
        order.append(stage)

    for stage in sorted(payloads):
        visit(stage)
    return order


def export_inference(run: str | Path, out: str | Path) -> list[str]:
    """Write the inference-only copy of ``run`` into the new directory ``out``; returns the
    stages exported, in lineage order."""
    source, target = RunLayout(Path(run)), Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists: export into a new directory")
    source.read_run()  # a clear error when ``run`` is not a run
    payloads = {best.parent.name: load_checkpoint(best)
                for best in sorted(source.root.glob("*/best.pt"))}
    if not payloads:
        raise RunError(f"{source.root} has no finished stage to export")
    target.mkdir(parents=True)
    shutil.copyfile(source.run_file, target / RUN_FILE)
    layout, digests = RunLayout(target), {}
    order = lineage_order(payloads)
    for stage in order:
        payload = {k: v for k, v in payloads[stage].items()
                   if k not in DROPPED and k != "format_version"}
        payload["finished"] = True
        if payload.get("parent"):
            payload["parent"] = {**payload["parent"],
                                 "sha256": digests[payload["parent"]["stage"]]}
        if payload.get("uses"):
            payload["uses"] = [{**r, "sha256": digests[r["stage"]]} for r in payload["uses"]]
        save_checkpoint(layout.best(stage), payload)
        layout.last(stage).symlink_to(layout.best(stage).name)
        digests[stage] = file_sha256(layout.best(stage))
    return order
