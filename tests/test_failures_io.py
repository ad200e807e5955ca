"""Issue 24, round two: nothing lost, nothing hung. A cache file cut short is measured again (and
named); --force checks its inputs before it removes anything; I/O errors name their file and
cause; bad input is refused before an output directory is claimed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

DEV_FULL = Path("/dev/full")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    return data


def a_shard(data: Path) -> Path:
    from simulation.dataset import open_dataset

    return data / "shards" / open_dataset(data).meta["shards"][1]["file"]


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def bad_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "OneDegSq.fits"
    path.write_text("this is not a FITS table\n")
    return path


# -- 1. a cache file cut short is treated as absent, named, and measured again ------------------
def npz_cuts() -> list[tuple[str, object]]:
    return [("empty", 0), ("first 10 bytes", 10), ("first 100 bytes", 100),
            ("half", lambda n: n // 2), ("before the central directory", lambda n: n - 30)]


@pytest.mark.parametrize("what, cut", npz_cuts(), ids=[name for name, _ in npz_cuts()])
def test_a_truncated_result_chunk_counts_as_absent_and_is_named(tmp_path, what, cut):
    """A chunk cut short by something else (a full disk, an interrupted copy) used to raise
    BadZipFile or EOFError in every rerun, --force included, naming no file."""
    from deblend.core.chunk_cache import read_chunk, write_chunk

    path = tmp_path / "chunk_00003.npz"
    write_chunk(path, "key", {"e": np.arange(500.0), "n": np.ones(40, np.int16)})
    data = path.read_bytes()
    path.write_bytes(data[:cut(len(data)) if callable(cut) else cut])
    with pytest.warns(UserWarning, match=rf"{re.escape(str(path))} is unreadable .*measuring"):
        assert read_chunk(path, "key") is None


def test_a_truncated_metacal_chunk_is_measured_again_and_replaced(tmp_path, monkeypatch):
    """The metacal benchmark's resume, one of the chunk cache's four users, end to end."""
    from deblend.core.chunk_cache import read_chunk
    from deblend.core.config import Config
    from evaluation import metacal_benchmark as bench

    config = Config()
    variant = bench.variants(config)[0]
    measured = []
    monkeypatch.setattr(bench, "draw_shear_pairs", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench, "measure_pairs",
                        lambda model, batch, cfg: measured.append(1) or {"x": np.arange(3.0)})
    monkeypatch.setattr(bench, "chunk_sizes", lambda n, size: [3, 3])

    class Bar:
        def update(self, n):
            pass

    first = bench.measure_variant(None, config, variant, tmp_path, "model", Bar())
    chunk = tmp_path / f"{variant.name}_chunk0001.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.warns(UserWarning, match=re.escape(str(chunk))):
        again = bench.measure_variant(None, config, variant, tmp_path, "model", Bar())
    assert len(measured) == 3  # two chunks, then only the damaged one again
    np.testing.assert_array_equal(again["x"], first["x"])
    key = bench._cache_key(config, variant, 1, 3, "model")
    assert read_chunk(chunk, key) is not None  # replaced


def test_a_truncated_dense_field_chunk_is_named_and_drawn_again(tmp_path, sample_catalog):
    from deblend.core.config import config_from_dict
    from simulation.dense_fields import CHUNK_DIR, chunk_name, generate_fields, open_fields

    config = config_from_dict({
        "simulation": {"catalog": str(sample_catalog)},
        "dense_fields": {"field_arcsec": 20.0, "min_galaxies": 3, "max_galaxies": 4,
                         "n_fields": 2, "max_mag": 25.3, "seed": 3}})
    root = tmp_path / "fields"
    quiet = {"progress": False, "chunk_size": 1}
    generate_fields(config, root, log=lambda _: None, **quiet)
    before = open_fields(root).images
    chunk = root / CHUNK_DIR / chunk_name(1)
    truncate(chunk, chunk.stat().st_size // 2)
    messages: list[str] = []
    generate_fields(config, root, log=messages.append, **quiet)
    assert any(str(chunk) in m and "drawing it again" in m for m in messages), messages
    np.testing.assert_array_equal(open_fields(root).images, before)


def test_a_shard_truncated_during_generation_is_named_when_drawn_again(tmp_path, tiny_config):
    from deblend.core.config import load_config
    from simulation.builder import build_dataset
    from simulation.dataset import SHARD_DIR, shard_name

    sim = load_config(tiny_config).simulation
    root = tmp_path / "data"
    quiet = {"progress": False, "num_shards": 3}
    build_dataset(sim, root, shard=0, log=lambda _: None, **quiet)  # one piece of three
    shard = root / SHARD_DIR / shard_name(0)
    truncate(shard, 1000)
    messages: list[str] = []
    build_dataset(sim, root, shard=0, log=messages.append, **quiet)
    assert any(str(shard) in m and "drawing it again" in m for m in messages), messages


def test_a_shard_truncated_after_the_dataset_was_finished_is_drawn_again(
        tmp_path, tiny_dataset, tiny_config):
    """It used to be refused as 'a finished dataset; pass --force', which drew everything
    again, and the main job skipped the data step and failed in training."""
    from deblend.core.config import load_config
    from simulation.builder import build_dataset
    from simulation.dataset import open_dataset

    data = copy_dataset(tiny_dataset, tmp_path)
    shard = a_shard(data)
    intact = sha(shard)
    others = {p.name: p.stat().st_mtime_ns for p in shard.parent.iterdir() if p != shard}
    truncate(shard, shard.stat().st_size // 2)
    messages: list[str] = []
    build_dataset(load_config(tiny_config).simulation, data, progress=False,
                  log=messages.append)
    assert any(str(shard) in m for m in messages), messages
    assert sha(shard) == intact
    assert {p.name: p.stat().st_mtime_ns for p in shard.parent.iterdir() if p != shard} == others
    assert open_dataset(data).dataset_id == open_dataset(tiny_dataset).dataset_id

    from simulation.builder import dataset_is_whole  # what the main job asks of its data step

    assert dataset_is_whole(data)
    truncate(shard, shard.stat().st_size // 2)
    assert not dataset_is_whole(data)


def test_a_truncated_fetched_cutout_is_downloaded_again(tmp_path, capsys):
    """des_validation.fetch kept any file of the right name: a cutout cut short stayed, and
    its object was skipped by every validation."""
    from test_des_fetch import fits_bytes

    from des_validation.datalab import CutoutRequest, download

    request = CutoutRequest(7, "r", "https://example.org/7/r")
    final = tmp_path / "7_r.fits"
    final.write_bytes(fits_bytes()[:3000])
    assert download(lambda url, t: fits_bytes(), request, tmp_path, 0, 1)
    assert final.read_bytes() == fits_bytes()
    said = capsys.readouterr().out
    assert str(final) in said and "truncated" in said, said


def test_a_truncated_fetched_catalog_is_queried_again(tmp_path):
    """A catalog.csv cut mid-row was used as it was, its last row short, in every rerun."""
    from test_des_fetch import FakeDataLab

    from deblend.core.config import DESConfig
    from des_validation.datalab import fetch

    out = tmp_path / "des"
    common = dict(retries=0, timeout=1, log=lambda _: None, sleep=lambda _: None)
    assert fetch(out, DESConfig(), None, 15.0, get=FakeDataLab([101, 102]), **common) == 2
    catalog = out / "catalog.csv"
    text = catalog.read_text()
    catalog.write_text(text[:text.rindex(",")])  # the last row cut short
    service, messages = FakeDataLab([101, 102]), []
    assert fetch(out, DESConfig(), None, 15.0, get=service,
                 **{**common, "log": messages.append}) == 2
    assert any("/tap/" in c for c in service.calls)
    assert any(str(catalog) in m and "querying it again" in m for m in messages), messages
    assert catalog.read_text() == text


# -- 2. --force validates its inputs before it removes or repoints anything ----------------------
def test_force_on_data_that_fail_keeps_the_stage_and_its_descendants(
        tmp_path, tiny_dataset, tiny_config, trained_run, capsys):
    """stage1 --force on new data used to clear stage1 and repoint run.json before reading
    them: bad data then cost stage1, stage2, stage3 and the flow."""
    import h5py

    from deblend.core.runs import RunLayout
    from deblend.train import main as train_main
    from training.runner import stage_status

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    layout = RunLayout(run)
    before = {p: sha(p) for p in (layout.best("stage1"), layout.last("stage1"), layout.run_file)}
    data = copy_dataset(tiny_dataset, tmp_path)
    with h5py.File(a_shard(data), "r+") as handle:
        handle["noisy"][3, 0, 10, 10] = np.nan
    assert train_main(["stage1", "--config", str(tiny_config), "--data", str(data), "--run",
                       str(run), "--force", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not finite" in err[0] and str(data) in err[0], err
    assert {p: sha(p) for p in before} == before
    assert all(stage_status(run, s) == "done" for s in ("stage1", "stage2", "stage3", "flow"))


def test_generate_force_with_a_bad_catalog_keeps_the_dataset(tmp_path, tiny_dataset,
                                                             tiny_config):
    """--force used to delete every shard, then fail on the catalog."""
    from deblend.core.config import load_config
    from simulation.builder import build_dataset
    from simulation.catalogs import CatalogError
    from simulation.dataset import dataset_is_complete

    data = copy_dataset(tiny_dataset, tmp_path)
    shards = {p.name: sha(p) for p in (data / "shards").iterdir()}
    bad = load_config(tiny_config).replace("simulation",
                                           catalog=str(bad_catalog(tmp_path))).simulation
    with pytest.raises(CatalogError, match="OneDegSq.fits"):
        build_dataset(bad, data, progress=False, force=True, log=lambda _: None)
    assert dataset_is_complete(data)
    assert {p.name: sha(p) for p in (data / "shards").iterdir()} == shards


def test_run_force_with_a_bad_catalog_keeps_the_run(tmp_path):
    """deblend run --force with a new config used to empty the run, then fail on the catalog."""
    from deblend.core.config import config_from_dict
    from deblend.pipeline import RunPaths, claim_run_directory, run_pipeline
    from simulation.catalogs import CatalogError

    paths = RunPaths(tmp_path / "run")
    claim_run_directory(paths, None, config_from_dict({"name": "a"}), force=False)
    paths.train.mkdir()
    (paths.train / "run.json").write_text("{}")
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump({"name": "b", "simulation": {
        "catalog": str(bad_catalog(tmp_path))}}))
    with pytest.raises(CatalogError, match="OneDegSq.fits"):
        run_pipeline(config, paths.root, force=True, progress=False, log=lambda _: None)
    assert (paths.train / "run.json").is_file() and "name: a" in paths.config.read_text()


# -- 5. messages name the file and the cause --------------------------------------------------
@pytest.fixture
def full_disk_at(tmp_path):
    """A path whose temporary sibling (``<path>.tmp``) writes to /dev/full: disk full."""
    if not DEV_FULL.exists():
        pytest.skip("no /dev/full")

    def make(name: str, suffix: str = ".tmp") -> Path:
        path = tmp_path / name
        os.symlink(DEV_FULL, path.with_name(path.name + suffix))
        return path

    return make


def test_a_full_disk_while_saving_a_checkpoint_says_disk_full_and_the_file(full_disk_at,
                                                                            capsys):
    """torch's writer turned a full disk into 'RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos', printed as an unexpected internal error."""
    import torch

    from deblend.core.cli import fail_cleanly
    from deblend.core.runs import save_checkpoint

    path = full_disk_at("last.pt")

    @fail_cleanly
    def main() -> int:
        save_checkpoint(path, {"weights": torch.zeros(1000)})
        return 0

    assert main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: disk full while writing {path}"), err
    assert "unexpected" not in err[0] and not path.exists()


def test_a_full_disk_while_writing_a_cache_chunk_names_the_file(full_disk_at):
    """A write() error names no file: '[Errno 28] No space left on device' alone."""
    from deblend.core.chunk_cache import write_chunk

    path = full_disk_at("chunk_00000.npz", ".tmp.npz")
    with pytest.raises(OSError) as caught:
        write_chunk(path, "key", {"e": np.zeros(100000)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)


def test_a_full_disk_while_drawing_the_field_report_figure_names_the_file(full_disk_at,
                                                                          trained_run):
    """cell.png was written in place: a full disk left half a PNG and an error naming no file."""
    from deblend.core.config import Config
    from deblend.core.inference import Deblender
    from evaluation.field_shear import FieldSettings, cell_figure

    fields = Config().replace("fields", populations=("galsim",), field_pixels=100, cell=50,
                              margin=35).fields
    path = full_disk_at("cell.png", ".tmp.png")
    os.symlink(DEV_FULL, path)  # written in place or aside, the disk is full
    with pytest.raises(OSError) as caught:
        cell_figure(Deblender.from_run(trained_run, device="cpu"), fields,
                    FieldSettings(cell=50, margin=35), path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)


def test_a_full_disk_while_writing_the_des_standin_catalog_names_the_file(tmp_path,
                                                                          monkeypatch):
    from astropy.table import Table

    from des_validation.standin_cutouts import write_standin

    written = Table.write

    def disk_full_at_catalog(self, path, *args, **kwargs):
        if Path(path).name.startswith("catalog.fits"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it
        written(self, path, *args, **kwargs)

    monkeypatch.setattr(Table, "write", disk_full_at_catalog)
    with pytest.raises(OSError) as caught:
        write_standin(tmp_path / "standin", n=1, log=lambda _: None)
    assert caught.value.filename == str(tmp_path / "standin.tmp" / "catalog.fits")


def test_a_full_disk_while_writing_the_fetch_query_names_the_file(full_disk_at):
    from test_des_fetch import FakeDataLab

    from deblend.core.config import DESConfig
    from des_validation.datalab import fetch

    query = full_disk_at("query.adql")
    os.symlink(DEV_FULL, query)  # written in place or aside, the disk is full
    with pytest.raises(OSError) as caught:
        fetch(query.parent, DESConfig(), None, 15.0, retries=0, timeout=1,
              get=FakeDataLab([101]), log=lambda _: None, sleep=lambda _: None)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(query)


def test_an_invalid_config_in_run_json_is_named(tmp_path, trained_run):
    from deblend.core.runs import RunError, RunLayout, run_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    layout = RunLayout(run)
    record = json.loads(layout.run_file.read_text())
    record["config"]["training"]["learning_rat"] = 1e-3  # an edit by hand
    layout.run_file.write_text(json.dumps(record))
    file = re.escape(str(layout.run_file))
    with pytest.raises(RunError, match=rf"{file} holds an invalid config \(unknown config key "
                                       rf"'training.learning_rat'"):
        run_config(run)


def test_force_retrains_a_first_stage_past_an_unreadable_run_json(tmp_path, tiny_dataset,
                                                                  tiny_config, trained_run):
    """With run.json cut short and no readable stage1 result, every command said 'train the
    first stage again with --force', and --force stopped on run.json too."""
    from deblend.core.runs import RunLayout
    from deblend.train import main as train_main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    layout = RunLayout(run)
    layout.run_file.write_text(layout.run_file.read_text()[:40])
    layout.best("stage1").write_bytes(b"")
    assert train_main(["stage1", "--config", str(tiny_config), "--data", str(tiny_dataset),
                       "--run", str(run), "--force", "--no-progress"]) == 0
    assert layout.read_run().data.dataset_id == json.loads(
        (trained_run / "run.json").read_text())["data"]["dataset_id"]


def test_labels_of_a_truncated_shard_name_the_shard(tmp_path, tiny_dataset):
    """h5py's 'Unable to synchronously open file (truncated file: eof = ...)' names no file."""
    from simulation.dataset import DatasetError, open_dataset

    data = copy_dataset(tiny_dataset, tmp_path)
    shard = a_shard(data)
    truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(DatasetError, match=rf"shard {re.escape(str(shard))} is truncated"):
        open_dataset(data).labels()


def test_an_unreadable_run_config_yaml_is_named_and_force_restarts(tmp_path):
    """A config.yaml cut short failed every `deblend run`, --force included, with a YAML parser
    error printed as an unexpected internal error."""
    from deblend.core.config import config_from_dict
    from deblend.pipeline import RunPaths, claim_run_directory

    paths = RunPaths(tmp_path / "run")
    claim_run_directory(paths, None, config_from_dict({"name": "a"}), force=False)
    paths.config.write_text(paths.config.read_text()[:60] + "\n  - [")
    file = re.escape(str(paths.config))
    with pytest.raises(FileExistsError, match=rf"unreadable {file} .*--force"):
        claim_run_directory(paths, None, config_from_dict({"name": "a"}), force=False)
    claim_run_directory(paths, None, config_from_dict({"name": "a"}), force=True)
    assert "name: a" in paths.config.read_text()


def test_an_unreadable_dataset_plan_is_named(tmp_path, tiny_config):
    """It was called 'an unfinished dataset of another plan'."""
    from deblend.core.config import load_config
    from simulation.builder import build_dataset
    from simulation.dataset import PLAN_FILE, DatasetError

    sim = load_config(tiny_config).simulation
    root = tmp_path / "data"
    build_dataset(sim, root, shard=0, num_shards=3, progress=False, log=lambda _: None)
    (root / PLAN_FILE).write_text((root / PLAN_FILE).read_text()[:30])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(root / PLAN_FILE))} is unreadable"):
        build_dataset(sim, root, shard=1, num_shards=3, progress=False, log=lambda _: None)


# -- 6. every input is checked before the output is claimed ---------------------------------------
def test_run_refuses_a_bad_catalog_before_claiming_out(tmp_path):
    """The catalog was read after --out held the run's marker and config: the corrected
    command was then refused as 'started with another config'."""
    from deblend.pipeline import run_pipeline
    from simulation.catalogs import CatalogError

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"simulation": {"catalog": str(bad_catalog(tmp_path))}}))
    out = tmp_path / "run"
    with pytest.raises(CatalogError, match="OneDegSq.fits"):
        run_pipeline(config, out, progress=False, log=lambda _: None)
    assert not out.exists()


def test_generate_refuses_a_bad_catalog_before_writing(tmp_path, tiny_config):
    from deblend.core.config import load_config
    from simulation.builder import build_dataset
    from simulation.catalogs import CatalogError

    bad = load_config(tiny_config).replace("simulation",
                                           catalog=str(bad_catalog(tmp_path))).simulation
    with pytest.raises(CatalogError, match="OneDegSq.fits"):
        build_dataset(bad, tmp_path / "data", progress=False, log=lambda _: None)
    assert not (tmp_path / "data").exists()

