"""The chain of stages in a run: each later stage is built on its parent's ``best.pt``.

A stage's checkpoint records the SHA-256 of the parent ``best.pt`` it was trained on; these
helpers load finished stages and refuse chains whose parent was re-trained afterwards.
"""

from __future__ import annotations

from typing import Any

from training.checkpoints import file_sha256, load_checkpoint
from training.run_layout import PREVIOUS_STAGE, STAGES, RunError, RunLayout


def load_finished(layout: RunLayout, stage: str, needed_by: str) -> tuple[dict[str, Any], str]:
    """``best.pt`` of a finished ``stage`` and its SHA-256; a clear error when there is none."""
    best, last = layout.best(stage), layout.last(stage)
    if not best.is_file():
        raise RunError(f"{needed_by} needs the {stage} result, but {best} does not exist: run "
                       f"`python -m deblend.train {stage} --run {layout.root} ...` first")
    if last.is_file():
        state = load_checkpoint(last)
        if not state["finished"]:
            raise RunError(f"{needed_by} needs a finished {stage}, but {stage} in {layout.root} "
                           f"stopped after epoch {state['epoch']} of {state['total_epochs']}: "
                           f"finish it with `python -m deblend.train {stage} --run "
                           f"{layout.root} --resume`")
    return load_checkpoint(best), file_sha256(best)


def check_parent(layout: RunLayout, stage: str, payload: dict[str, Any], parent_sha: str) -> None:
    """Refuse ``payload`` (of ``stage``) unless it was trained on the parent with ``parent_sha``."""
    parent = PREVIOUS_STAGE[stage]
    recorded = (payload.get("parent") or {}).get("sha256")
    if recorded != parent_sha:
        raise RunError(f"{stage} in {layout.root} was trained on another {parent} result than the "
                       f"one now in {layout.best(parent)} ({parent} was re-trained since): "
                       f"train {stage} again with --force")


def load_lineage(layout: RunLayout, upto: str, needed_by: str
                 ) -> dict[str, tuple[dict[str, Any], str]]:
    """(``best.pt`` payload, SHA-256) of stage1 .. ``upto``, checked to be finished and to build
    on each other."""
    lineage: dict[str, tuple[dict[str, Any], str]] = {}
    previous_sha = ""
    for stage in STAGES[:STAGES.index(upto) + 1]:
        payload, sha = load_finished(layout, stage, needed_by)
        if stage in PREVIOUS_STAGE:
            check_parent(layout, stage, payload, previous_sha)
        lineage[stage], previous_sha = (payload, sha), sha
    return lineage
