"""Detection quality by SEP's deblending contrast (evaluation.detection_quality)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from benchmarks.detection_contrast import main
from deblend.core.metadetect import detect_cell
from evaluation.detection_quality import (
    COUNTS,
    detection_quality,
    field_counts,
    match_to_truth,
)


def test_detections_belong_to_the_nearest_centre_within_the_radius() -> None:
    truth = np.array([[10.0, 10.0], [20.0, 10.0]])
    detections = np.array([[11.0, 10.0], [16.0, 10.0], [14.0, 10.0], [10.0, 30.0]])
    assert match_to_truth(detections, truth, 5.0).tolist() == [0, 1, 0, -1]
    assert match_to_truth(detections, truth, 0.5).tolist() == [-1, -1, -1, -1]
    assert match_to_truth(np.zeros((0, 2)), truth, 5.0).tolist() == []
    assert match_to_truth(detections, np.zeros((0, 2)), 5.0).tolist() == [-1] * 4


def test_found_shredded_missed_merged_and_spurious_are_counted() -> None:
    """Galaxy 0 has two detections (found, shredded); 1 none, with 0's detection 8 px away
    (missed, merged); 2 none and nothing near (missed); 3 one (found); 4 lies in the edge band
    and is not counted; one detection matches nothing (spurious); one in the edge band is not
    counted."""
    truth = np.array([[30.0, 30.0], [38.0, 30.0], [80.0, 80.0], [60.0, 30.0], [3.0, 50.0]])
    detections = np.array([[30.5, 30.0], [29.0, 31.5], [60.0, 31.0], [50.0, 70.0],
                           [3.0, 50.0]])
    counts = field_counts(detections, truth, np.ones(5, bool), (100, 100), match_pixels=5.0,
                          merge_pixels=10.0)
    assert counts == {"gold": 4, "found": 2, "shredded": 1, "missed": 2, "merged": 1,
                      "detections": 4, "spurious": 1}
    assert set(counts) == set(COUNTS)
    not_gold = field_counts(detections, truth, np.array([True, False, True, True, True]),
                            (100, 100), match_pixels=5.0, merge_pixels=10.0)
    assert not_gold["gold"] == 3 and not_gold["merged"] == 0


def test_a_faint_neighbour_is_split_off_only_at_a_low_contrast() -> None:
    """A neighbour of 0.4% of a bright galaxy's flux, 6 arcsec away on its wing: one detection
    at SEP's 0.005, two at 1e-5 (the real DES frames' faint pair, in GalSim)."""
    image = galsim.ImageD(121, 121, scale=0.2)
    bright = galsim.Exponential(half_light_radius=1.5, flux=2e6)
    faint = galsim.Exponential(half_light_radius=0.3, flux=8e3).shift(6.0, 0.0)
    galsim.Convolve(bright + faint, galsim.Moffat(beta=3, fwhm=0.8)).drawImage(image=image)
    data = image.array + np.random.default_rng(1).normal(0, 1.0, image.array.shape)
    merged = detect_cell(data, 1.0, 3.0, 5, 0.005)
    split = detect_cell(data, 1.0, 3.0, 5, 1e-5)
    assert len(merged) == 1 and len(split) == 2
    assert np.hypot(*(split - [90.0, 60.0]).T).min() < 1.5  # 30 pixels right of the centre


def test_the_benchmark_counts_one_field_set_at_two_contrasts(capsys) -> None:
    result = detection_quality(["galsim"], [0.005, 1e-5], n_fields=1, progress=False)
    for rates in result["galsim"].values():
        assert rates["images"] == 2 and rates["gold"] > 20
        assert rates["found"] + rates["missed"] == rates["gold"]
        assert rates["shredded"] <= rates["found"] and rates["merged"] <= rates["missed"]
        assert 0.5 < rates["completeness"] <= 1
    low, default = result["galsim"][1e-5], result["galsim"][0.005]
    assert low["detections"] >= default["detections"]
    assert main(["--n-fields", "1", "--population", "galsim", "--contrast", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "| galsim | 0.005 |" in out and "shredded" in out
    with pytest.raises(ValueError, match="deblend_contrast must be a number in"):
        detection_quality(["galsim"], [1.5], n_fields=1)
