"""The sheared-field benchmark runs end to end on a small field, resumes from its cache, and its
command line prints the table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.field_shear import ESTIMATORS, FieldSettings, bias, run_field_benchmark


def test_bias_of_exact_sums_is_the_applied_shear():
    """Sums built from a known response and shear give m = 0, c = 0 (and m = 0.1 when the
    estimate is 10% high): the arithmetic of m, c and the jackknife."""
    def image(sign: int, scale: float) -> dict:
        e = scale * 0.5 * np.array([0.02 * sign, 0.0]) + np.array([1e-4, 0.0])
        steps = np.array([[*(e * 10), 10.0], [*(e * 10 + [0.05, 0]), 10.0],
                          [*(e * 10 - [0.05, 0]), 10.0], [*(e * 10 + [0, 0.05]), 10.0],
                          [*(e * 10 - [0, 0.05]), 10.0]])
        return {"deblend": steps}
    for scale, expected in ((1.0, 0.0), (1.1, 0.1)):
        sets = [{k: image(s, scale) for k, s in (("plus", 1), ("minus", -1), ("plus_rot", 1),
                                                 ("minus_rot", -1))} for _ in range(3)]
        result = bias(sets, "deblend", (0.02, 0.0), 0.01)
        assert result["m1"] == pytest.approx(expected, abs=1e-9)
        assert result["c1"] == pytest.approx(2e-4 * scale ** 0, rel=1e-6)
        assert result["m1_err"] == pytest.approx(0.0, abs=1e-12)
        two = bias(sets[:2], "deblend", (0.02, 0.0), 0.01)
        assert two["m1_err"] == pytest.approx(0.0, abs=1e-12)  # a jackknife of two sets


@pytest.mark.slow
def test_field_benchmark_runs_in_shards_and_processes_and_resumes(trained_run, tmp_path):
    """A shard measures only its share (on two forked processes) and reports nothing; the
    full run measures the rest and reports finite m, c; a third run measures nothing."""
    from deblend.core.inference import Deblender

    model = Deblender.from_run(trained_run, device="cpu")
    logs = []
    kwargs = dict(populations=("galsim",), n_fields=2, field_pixels=120, log=logs.append,
                  settings=FieldSettings(cell=60, margin=35))
    assert run_field_benchmark(model, "tiny", tmp_path, shard=(1, 2), jobs=2, **kwargs) is None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "galsim-g1-0001.npz", "galsim-g2-0001.npz"]  # places 1 and 3 of 4
    assert len(logs) == 2
    logs.clear()
    results = run_field_benchmark(model, "tiny", tmp_path, **kwargs)
    assert len(logs) == 2 and len(list((tmp_path / "cache").iterdir())) == 4
    row = results["galsim"]
    assert set(row) == set(ESTIMATORS)
    for name in ESTIMATORS:
        assert np.isfinite([row[name]["m1"], row[name]["m2"], row[name]["c1"],
                            row[name]["c2"], row[name]["m1_err"]]).all(), name
        assert row[name]["sets_for_target"] >= 1
    assert row["deblend"]["objects_per_image"] > 0
    logs.clear()
    again = run_field_benchmark(model, "tiny", tmp_path, **kwargs)
    assert logs == [] and again["galsim"]["deblend"]["m1"] == row["deblend"]["m1"]
    with pytest.raises(ValueError, match="shard"):
        run_field_benchmark(model, "tiny", tmp_path, shard=(2, 2), **kwargs)


@pytest.mark.slow
def test_fields_command_prints_the_table(trained_run, tmp_path, capsys):
    from benchmarks.fields import main

    assert main(["--run", str(trained_run), "--out", str(tmp_path), "--n-fields", "1",
                 "--population", "galsim", "--field-pixels", "100", "--cell", "50",
                 "--no-anacal", "--target-psf-fwhm", "1.9"]) == 0
    text = capsys.readouterr().out
    assert "| galsim | deblend |" in text and "| galsim | hsm |" in text
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report.md").is_file()
    # metacal reconvolved every image to the round Gaussian asked for, and says so
    assert json.loads((tmp_path / "metrics.json").read_text())["fields"]["target_psf_fwhm"] == 1.9
    assert 'one round Gaussian per band, FWHM 1.9"' in (tmp_path / "report.md").read_text()
    assert (tmp_path / "cell.png").stat().st_size > 1000
    assert main(["--run", str(trained_run), "--g", "0.5"]) == 2
    with pytest.raises(SystemExit):
        main(["--run", str(trained_run), "--shard", "3/3"])


@pytest.mark.slow
def test_cell_speed_benchmark_measures_every_path(capsys):
    """``python -m benchmarks.cell_speed --fields 1 --cell 150 --jobs 2`` (untrained networks,
    two forked processes) prints every rate."""
    from benchmarks.cell_speed import main

    result = main(["--fields", "1", "--cell", "150", "--margin", "30", "--jobs", "2"])
    text = capsys.readouterr().out
    for key in ("deblend_population", "deblend_with_object_response", "anacal"):
        assert result[f"{key}_galaxies_per_s"] > 0 and key in text
    assert result["galaxies"] > 10 and result["cells"] == 4 and result["kept_detections"] > 5
    assert result["margin_overhead"] == pytest.approx(4 * 180 ** 2 / 300 ** 2)


def test_memory_benchmark_streams_a_dataset_as_stage1_reads_it(tiny_dataset):
    """The memory benchmark's streaming child reads through today's data loader (it called it
    with arguments the loader no longer takes, and ``python -m benchmarks`` crashed)."""
    from benchmarks.memory import stream_one_epoch
    from simulation.dataset import open_dataset

    n = len(open_dataset(tiny_dataset).split_indices("train"))
    assert stream_one_epoch(tiny_dataset, batch_size=16) == -(-n // 16)
