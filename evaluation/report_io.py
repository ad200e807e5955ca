"""Output files of the evaluation: metrics.json, report.md sections, formatting.

``report.md`` is made of sections delimited by ``<!-- section:NAME -->`` and
``<!-- /section:NAME -->`` so that a later command (the shear calibration) can replace its own
section without touching the rest. ``metrics.json`` holds every number of the report; NaN and
infinities are written as ``null``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from deblend.core.atomic import write_text_atomic
from deblend.core.outputs import refuse_foreign

EVALUATION_KIND = "evaluation"
"""The kind of output an evaluation directory (report and shear calibration) is."""
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
MISSING = "–"


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays converted, NaN/inf -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def read_metrics(out: str | Path, *, rebuild: bool = False) -> dict[str, Any]:
    """``out/metrics.json``, or an empty dict when there is none.

    An unreadable file (e.g. truncated) is an error naming it; with ``rebuild`` (a command's
    ``--force``) it counts as absent, to be written anew.
    """
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
        return metrics
    except (ValueError, UnicodeDecodeError) as exc:
        if rebuild:
            return {}
        raise ValueError(f"{path} is unreadable ({exc}); pass --force to write it anew") from exc


def claim_evaluation_directory(out: str | Path) -> bool:
    """Whether ``out`` holds deblend's evaluation output (a report, a shear calibration, or both)
    or is new; FileExistsError when it holds anything else (:mod:`deblend.core.outputs`).
    Directories written before outputs were marked are recognised by their metrics.json."""
    return refuse_foreign(out, EVALUATION_KIND, legacy=_has_deblend_metrics)


def _has_deblend_metrics(out: Path) -> bool:
    try:
        return bool({"meta", "shear"} & set(read_metrics(out)))
    except ValueError:
        return False


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` (made JSON-safe) to ``out/metrics.json`` atomically."""
    text = json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(Path(out) / METRICS_FILE, text)


def section(name: str, body: str) -> str:
    """A named, replaceable block of markdown."""
    return f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- /section:{name} -->\n"


def replace_section(markdown: str, name: str, body: str) -> str:
    """``markdown`` with section ``name`` replaced by ``body`` (appended if absent)."""
    block = section(name, body)
    key = re.escape(name)
    pattern = re.compile(rf"<!-- section:{key} -->.*?<!-- /section:{key} -->\n?", re.S)
    if pattern.search(markdown):
        return pattern.sub(lambda _: block, markdown, count=1)
    return markdown.rstrip() + "\n\n" + block


# -- formatting -----------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    """A number with ``digits`` decimals ('–' for None/NaN); ints as they are."""
    if value is None:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_err(value: Any, error: Any, digits: int = 3, signed: bool = False) -> str:
    """'value ± error' (either may be missing)."""
    text = fmt(value, digits, signed)
    if text == MISSING or error is None or not math.isfinite(float(error)):
        return text
    return f"{text} ± {float(error):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` entries 'l' or 'r' (default: first left, rest right)."""
    header = [str(h) for h in header]
    align = list(align) if align else ["l"] + ["r"] * (len(header) - 1)
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def noise_correction_words(on: bool) -> str:
    """``metacal.noise_correction`` in words: metacal's correction noise, which AnaCal's own
    noise-bias correction uses too (:func:`evaluation.metacal_shear.anacal_measurement`)."""
    return ("noise correction on (metacal's, and AnaCal's own with the same noise)" if on
            else "noise correction off")


def reconvolution_words(target_psf_fwhm: float | Sequence[float] | None) -> str:
    """Metacal's reconvolution in words: to one round Gaussian of ``target_psf_fwhm`` (arcsec,
    one for every band or one per band), or (None) to each band's narrowest."""
    if target_psf_fwhm is None:
        return "metacal reconvolves each band to the narrowest round Gaussian its PSF allows"
    values = ", ".join(f"{v:g}" for v in np.atleast_1d(target_psf_fwhm))
    return f"metacal reconvolves every image to one round Gaussian per band, FWHM {values}\""
