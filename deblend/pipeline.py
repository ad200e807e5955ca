"""The main job: simulate, train three stages, evaluate, calibrate shear, validate on DES-like data.

``python -m deblend run --config configs/quick.yaml --out RUN`` writes::

    RUN/config.yaml          the config the run was started with (a different one is refused)
    RUN/data/                LSST dataset (simulation.generate)
    RUN/train/               training run: stage1, stage2, flow, amortize (with
                             training.amortized_map), stage3 (deblend.train)
    RUN/evaluation/          report.md, metrics.json, PNGs, shear calibration (evaluation.*)
    RUN/metacal_shear/       metacalibrated shear vs the applied shear, on populations no
                             network saw (evaluation.metacal_benchmark; the headline)
    RUN/map_deblending/      with ``map.enabled``: encoder vs MAP deblending (N(0, I) and flow
                             priors) on validation blends and dense fields (evaluation.map_report)
    RUN/des_standin/         DES-like cutouts + im3shape-like catalog (des_validation.standin)
    RUN/des_validation/      report.md, metrics.json, PNGs (des_validation.validate)
    RUN/index.md             links to every report and figure, with the headline numbers

Every step is skipped when its outputs are complete, and resumed where the step itself can
resume (dataset shards, training epochs, shear populations), so re-running the same command after
an interruption picks up where it stopped.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from deblend.core.atomic import write_json_atomic, write_text_atomic
from deblend.core.config import Config, ConfigError, config_from_dict, load_config
from deblend.core.outputs import MARKER, is_ours, mark
from des_validation.standin_cutouts import standin_is_complete, write_standin
from des_validation.validation import validate_des, validation_is_complete
from evaluation.field_shear import field_report_is_complete, field_table, run_field_report
from evaluation.map_report import REPORT_FILE, run_map_comparison
from evaluation.metacal_benchmark import (
    benchmark_is_complete,
    run_metacal_benchmark,
    shear_table,
)
from evaluation.report_io import read_metrics
from evaluation.results import DESValidationResult, EllipticityStats, EvaluationResult
from evaluation.shear_calibration import measure_shear, shear_is_complete
from evaluation.validation_report import report_is_complete, write_report
from simulation.builder import build_dataset, check_catalog, dataset_is_whole
from simulation.dataset import open_dataset
from training.runner import run_stage, stage_status
from training.stages import STAGES

STEPS = ("simulate", *STAGES, "report", "shear", "metacal_shear", "fields", "map_deblending",
         "des_standin", "des_validation", "index")
COMMAND = "python -m deblend run"
"""How the reports written by the main job name the command that produced them."""


@dataclass(frozen=True)
class RunPaths:
    """Where the main job puts each step's output."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def metacal_shear(self) -> Path:
        return self.root / "metacal_shear"

    @property
    def fields(self) -> Path:
        return self.root / "fields"

    @property
    def map_deblending(self) -> Path:
        return self.root / "map_deblending"

    @property
    def des_standin(self) -> Path:
        return self.root / "des_standin"

    @property
    def des_validation(self) -> Path:
        return self.root / "des_validation"

    @property
    def index(self) -> Path:
        return self.root / "index.md"

    @property
    def headline(self) -> Path:
        return self.root / "headline.json"

    def outputs(self) -> list[Path]:
        """Everything the main job writes in its run directory (with the ``.tmp`` siblings
        that directories are built in)."""
        directories = [self.data, self.train, self.evaluation, self.metacal_shear,
                       self.fields, self.map_deblending, self.des_standin, self.des_validation]
        return ([self.config, self.index, self.headline] + directories
                + [d.with_name(d.name + ".tmp") for d in directories])


RUN_KIND = "run"
"""The kind of output a main-job directory is (:mod:`deblend.core.outputs`)."""


def claim_run_directory(paths: RunPaths, config_path: Path | None, config: Config,
                        force: bool) -> None:
    """Record the (already validated) config in a new run; refuse a run of another config.

    ``force`` restarts a run of another config (or whose config.yaml was lost) from scratch, but
    only removes what the main job writes there, and only in a directory marked as a run
    (:mod:`deblend.core.outputs`): any other non-empty directory is refused, with or without
    ``force``.
    """
    wanted = config.to_dict()
    ours = is_ours(paths.root, RUN_KIND)
    previous, unreadable = recorded_config(paths)
    if isinstance(previous, dict) and previous != wanted:
        try:  # recorded before keys were added: they take their defaults
            previous = config_from_dict(previous).to_dict()
        except ConfigError:
            pass
    if previous == wanted:
        if not ours:  # a run started before runs were marked
            mark(paths.root, RUN_KIND)
        return
    if paths.root.exists() and any(paths.root.iterdir()):
        if not ours:
            raise FileExistsError(f"{paths.root} exists and is not a deblend run (no {MARKER} "
                                  f"file): choose another --out (--force only replaces a deblend "
                                  f"run)")
        if not force:
            why = (unreadable or ("was started with another config" if previous is not None
                                  else f"has lost its {paths.config.name}"))
            raise FileExistsError(f"{paths.root} {why}; use another --out, or --force to start "
                                  f"it again from scratch")
        for path in paths.outputs():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    mark(paths.root, RUN_KIND)
    header = f"# config of this run (from {config_path or 'the embedded defaults'})\n"
    write_text_atomic(paths.config, header + yaml.safe_dump(wanted, sort_keys=False))


def recorded_config(paths: RunPaths) -> tuple[Any, str]:
    """The config a run was started with (None when there is none) and, when its config.yaml
    cannot be read (truncated, not text), why, in words naming the file."""
    if not paths.config.is_file():
        return None, ""
    try:
        return yaml.safe_load(paths.config.read_text()), ""
    except (yaml.YAMLError, ValueError, OSError) as exc:
        return None, (f"has an unreadable {paths.config} ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())})")


def run_pipeline(config_path: str | Path | None, out: str | Path, *, jobs: int = 1,
                 force: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every step of the main job; returns the headline numbers.

    Each step is a library call; its owner says whether its output is complete, and a step
    that fails raises, with its own message, to the command line's one-line error.
    """
    config_path = Path(config_path) if config_path is not None else None
    config = load_config(config_path)
    if config.simulation.target_psf_fwhm is not None:
        raise ValueError(
            "config key 'simulation.target_psf_fwhm': the main job's reports (the shear "
            "calibration, the MAP comparison, the DES validation) give the networks images at the "
            "survey's PSF, which a model trained on homogenised images never saw; train it with "
            "python -m deblend.train and measure it through metacal (python -m "
            "benchmarks.metacal, benchmarks.conditions)")
    paths = RunPaths(Path(out))
    if not (dataset_is_whole(paths.data) and recorded_config(paths)[0] == config.to_dict()):
        check_catalog(config.simulation)  # the first step's input, before the run is claimed
    claim_run_directory(paths, config_path, config, force)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, done: bool, action: Callable[[], Any]) -> None:
        if done:
            log(f"[{name}] complete, skipped")
            return
        log(f"[{name}] running")
        t0 = time.perf_counter()
        action()
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] done in {timings[name]:.0f} s")

    step("simulate", dataset_is_whole(paths.data),
         lambda: build_dataset(config.simulation, paths.data, jobs=jobs, progress=progress,
                               log=log))
    for stage in STAGES:
        if not STAGES[stage].enabled(config):
            continue
        status = stage_status(paths.train, stage)
        first = STAGES[stage].parent is None
        step(stage, status == "done",
             lambda s=stage, st=status, f=first: run_stage(
                 s, paths.train, data_dir=paths.data if f else None, config=config if f else None,
                 resume=st == "interrupted",
                 force=st == "todo" and paths.train.joinpath(s).exists(),  # parent re-trained
                 progress=progress, log=log))
    step("report", report_is_complete(paths.evaluation),
         lambda: write_report(paths.train, paths.data, paths.evaluation, config=config,
                              force=True, progress=progress, command=COMMAND, log=log))
    step("shear", shear_is_complete(paths.evaluation),
         lambda: measure_shear(paths.train, config, paths.evaluation, progress=progress,
                               command=COMMAND, config_path=str(paths.config), log=log))
    step("metacal_shear", benchmark_is_complete(paths.metacal_shear),
         lambda: run_metacal_benchmark(paths.train, config, paths.metacal_shear,
                                       progress=progress, log=log))
    if config.fields.enabled:
        step("fields", field_report_is_complete(paths.fields),
             lambda: run_field_report(paths.train, config, paths.fields, log=log))
    if config.map.enabled:
        step("map_deblending", (paths.map_deblending / REPORT_FILE).is_file(),
             lambda: run_map_comparison(paths.train, config, paths.map_deblending,
                                        data=open_dataset(paths.data), log=log))
    step("des_standin", standin_is_complete(paths.des_standin),
         lambda: write_standin(paths.des_standin, config, log=log))
    step("des_validation", validation_is_complete(paths.des_validation),
         lambda: _validate_des(paths, config, log))

    headline = headline_numbers(paths)
    headline["seconds"] = timings
    headline["total_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    write_index(paths, headline)
    log(f"[index] {paths.index}")
    return headline


def _validate_des(paths: RunPaths, config: Config, log: Callable[[str], None]) -> None:
    """The DES validation of the trained run on the stand-in (and on the real DECam frames of
    ``des.real_frames``); an error when nothing validated."""
    metrics = validate_des(paths.train, paths.des_standin / "catalog.fits",
                           paths.des_standin / "mef", paths.des_validation, config.des,
                           force=True, command=COMMAND,
                           target_psf_fwhm=config.metacal.target_psf_fwhm, log=log)
    if metrics.counts["validated"] == 0:
        raise ValueError(f"no DES stand-in object could be validated: see "
                         f"{paths.des_validation / 'skipped.csv'}")


def headline_numbers(paths: RunPaths) -> dict[str, Any]:
    """The numbers a cosmologist reads first, from the reports' typed results."""
    evaluation = EvaluationResult.read(paths.evaluation)
    des = DESValidationResult.read(paths.des_validation)
    headline: dict[str, Any] = {"fidelity": {}, "slopes": {}, "shear": {}, "des_standin": {}}
    metacal = read_metrics(paths.metacal_shear).get("metacal_shear")
    if metacal is not None:
        headline["metacal_shear"] = {
            "applied_g": metacal["applied_g"],
            "variants": {name: {"label": v["label"], "n_scenes": v["n_scenes"], "estimators": {
                est: {k: r[k] for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2",
                                        "c2_err", "n_scenes")}
                for est, r in v["estimators"].items()}} for name, v in metacal["variants"].items()},
        }
    fields = read_metrics(paths.fields).get("fields")
    if fields is not None:
        headline["fields"] = {
            "applied_g": fields["applied_g"], "field_pixels": fields["field_pixels"],
            "results": {population: {name: {k: v for k, v in r.items()}
                                     for name, r in row.items()}
                        for population, row in fields["results"].items()}}
    map_metrics = read_metrics(paths.map_deblending)
    if map_metrics:
        headline["map_deblending"] = {
            kind: {method: {"flux_median": m["flux"]["median"], "flux_nmad": m["flux"]["nmad"],
                            "ssim_median": m["ssim"]["median"],
                            "recon_offset": [m["recon_moments"][c]["mean_offset"]
                                             for c in ("e1", "e2")],
                            "ms_per_galaxy": 1000 * m["seconds_per_galaxy"]}
                   for method, m in map_metrics[kind].items()}
            for kind in ("blends", "fields") if kind in map_metrics}
    if evaluation is not None:
        for stage, fidelity in evaluation.fidelity.items():
            headline["fidelity"][stage] = {"ssim": fidelity.ssim_mean,
                                           "cosine": fidelity.cosine_mean}
        for name, breakdown in evaluation.ellipticity.items():
            headline["slopes"][name] = _slopes(breakdown.all)
        if evaluation.shear is not None:
            calibration = evaluation.shear.calibration
            for suffix, part in (("1", calibration.g1), ("2", calibration.g2)):
                for name, fit in part.estimators.items():
                    headline["shear"].setdefault(name, {}).update({
                        f"m{suffix}": fit.m, f"m{suffix}_err": fit.m_err,
                        f"c{suffix}": fit.c, f"c{suffix}_err": fit.c_err})
    if des is not None:
        for name, estimator in des.estimators.items():
            headline["des_standin"][name] = _slopes(estimator.stats)
    return headline


def _slopes(stats: EllipticityStats) -> dict[str, dict[str, float | None]]:
    return {"e1": {"slope": stats.e1.slope, "rmse": stats.e1.rmse},
            "e2": {"slope": stats.e2.slope, "rmse": stats.e2.rmse}}


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_index(paths: RunPaths, headline: dict[str, Any]) -> None:
    """``RUN/index.md``: headline numbers and links to every report and figure."""
    lines = [f"# deblend run `{paths.root.name}`", "",
             "Config: [config.yaml](config.yaml). Every number below comes from the reports' "
             "`metrics.json`.", ""]
    metacal = read_metrics(paths.metacal_shear).get("metacal_shear")
    if metacal is not None:
        g = metacal["applied_g"]
        lines += ["## Shear bias against the applied shear (metacalibration)", "",
                  f"Populations no network or calibration was fitted on, sheared by "
                  f"(+-{g[0]:g}, +-{g[1]:g}) with the same noise; m = g_hat / g - 1. Details: "
                  "[metacal_shear/report.md](metacal_shear/report.md).", "",
                  shear_table(metacal), ""]
    fields = read_metrics(paths.fields).get("fields")
    if fields is not None:
        lines += ["## Shear from pixels: metadetection on sheared fields", "",
                  "Detection on every metacal image, the population response holding the "
                  "detection and selection terms, on whole sheared fields of the training "
                  "catalog (btk) and of the GalSim population. "
                  "Details: [fields/report.md](fields/report.md); a measured cell: "
                  "[fields/cell.png](fields/cell.png).", "",
                  field_table(fields["results"]), ""]
    lines += ["## Image fidelity (noisy-blend validation set)", "",
              "| model | SSIM | cosine |", "|---|---|---|"]
    for stage, v in headline["fidelity"].items():
        lines.append(f"| {stage} | {_fmt(v['ssim'])} | {_fmt(v['cosine'], 4)} |")
    for title, key in (("Ellipticity vs truth (validation blends)", "slopes"),
                       ("DES-like stand-in vs its im3shape-like catalog", "des_standin")):
        lines += ["", f"## {title}", "", "| estimator | slope e1 | slope e2 | RMSE e1 | RMSE e2 |",
                  "|---|---|---|---|---|"]
        for name, v in headline[key].items():
            lines.append(f"| {name} | {_fmt(v['e1']['slope'])} | {_fmt(v['e2']['slope'])} | "
                         f"{_fmt(v['e1']['rmse'])} | {_fmt(v['e2']['rmse'])} |")
    lines += ["", "## Secondary: shear response relative to truth moments, training population "
              "(<e> = (1 + m) A_truth g + c)", "",
              "| estimator | m1 | c1 | m2 | c2 |", "|---|---|---|---|---|"]
    for name, v in headline["shear"].items():
        lines.append(f"| {name} | {_fmt(v['m1'])} ± {_fmt(v['m1_err'])} | "
                     f"{_fmt(v['c1'], 4)} ± {_fmt(v['c1_err'], 4)} | {_fmt(v['m2'])} ± "
                     f"{_fmt(v['m2_err'])} | {_fmt(v['c2'], 4)} ± {_fmt(v['c2_err'], 4)} |")
    lines += ["", "## Reports and figures", ""]
    for directory, title in ((paths.evaluation, "Evaluation report"),
                             (paths.metacal_shear, "Metacalibrated shear report"),
                             (paths.map_deblending, "MAP deblending report"),
                             (paths.des_validation, "DES validation report"),
                             (paths.train, "Training")):
        if not directory.is_dir():
            continue
        rel = directory.relative_to(paths.root)
        if (directory / "report.md").is_file():
            lines.append(f"- [{title}]({rel}/report.md), [metrics.json]({rel}/metrics.json)")
        else:
            lines.append(f"- {title}: `{rel}/`")
        for png in sorted(directory.rglob("*.png")):
            lines.append(f"  - [{png.relative_to(directory)}]({png.relative_to(paths.root)})")
    timings = headline.get("seconds", {})
    if timings:
        lines += ["", "## Time of the steps run by the last invocation", "",
                  "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in timings.items()]
    write_text_atomic(paths.index, "\n".join(lines) + "\n")
    write_json_atomic(paths.headline, headline)
