"""The report's rules on a frame of runs: "did not train", deltas per budget rule, what the ± is over."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from imnet_ablate import report

EXP = OmegaConf.create({"name": "t", "baseline": "full", "sets": [{"label": "full"}, {"label": "250pc"},
                                                                 {"label": "wordnet-127"}, {"label": "scratch"}],
                        "paper": {"PASCAL-DET": {"full": 58.3, "250pc": 54.6}}})


def runs(label: str, budget: str, top1: float | None, classes: int | None, scores: list[float], **extra) -> list[dict]:
    """One transfer row per score, as ``report.collect`` reads them (transfer seeds 0.., one pre-training)."""
    pre = {} if top1 is None else {"pretrain_seed": 0, "pretrain_top1": top1, "pretrain_classes": classes,
                                   "trained": not report.did_not_train(top1, classes), "rule": budget,
                                   "iterations": 750, "epochs": 2, "classes": classes, "images": 24000}
    return [{"set": label, "task": "voc-det", "budget": budget, "seed": k, "score": s, "score_name": "mAP",
             "protocol": None, "paper_task": "PASCAL-DET", **pre, **extra} for k, s in enumerate(scores)]


@pytest.fixture
def table() -> pd.DataFrame:
    rows = (runs("full", "same_epochs", 18.1, 1000, [0.37, 0.38, 0.39], imagenet_top1=18.1, imagenet_top5=40.0,
                 imagenet_from=report.OWN)
            + runs("250pc", "same_epochs", 1.0, 1000, [0.25, 0.25, 0.25])
            + runs("wordnet-127", "same_epochs", 55.7, 127, [0.34, 0.35, 0.36], imagenet_top1=9.5, imagenet_top5=25.0,
                   imagenet_from="probe")
            + [{**r, "pretrain_seed": math.nan} for r in runs("scratch", "same_epochs", None, None, [0.24, 0.25])])
    return report.summarize(pd.DataFrame(rows), EXP)


def test_threshold_is_chance_plus_two_points_or_twice_chance() -> None:
    assert report.trained_threshold(1000) == pytest.approx(2.1)
    assert report.trained_threshold(9) == pytest.approx(100 / 9 * 3)
    assert report.did_not_train(1.0, 1000) and not report.did_not_train(2.2, 1000)
    assert not report.did_not_train(None, None)  # scratch: nothing to judge


def test_a_set_that_did_not_train_is_marked_kept_out_of_deltas_and_warned(table: pd.DataFrame) -> None:
    by_set = table.set_index("set")
    assert by_set.loc["full", "delta"] == 0 and by_set.loc["wordnet-127", "delta"] == pytest.approx(-0.03)
    assert math.isnan(by_set.loc["250pc", "delta"]) and not by_set.loc["250pc", "trained"]
    text = report.markdown_table(table)
    row = next(line for line in text.splitlines() if line.startswith("| voc-det | 250pc"))
    assert "1.0 (did not train)" in row and row.split(" | ")[-2] == "-"  # no Δ, the paper's Δ still shown
    notes = report.warnings(table, EXP)
    assert any(n.startswith("250pc (same_epochs): pre-training top-1 1.0% is below 2.1%") for n in notes)


def test_table_shows_budget_iterations_imagenet_column_and_what_the_spread_is_over(table: pd.DataFrame) -> None:
    lines = report.markdown_table(table).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:9] == ["budget", "classes", "images", "iterations", "epochs", "pre-train top-1",
                           "ImageNet top-1 / top-5"]
    assert "± std over 3 transfers of 1 pre-training" in header and "pre-trainings x transfers" in header
    cells = {line.split(" | ")[1]: [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["wordnet-127"][2:9] == ["same_epochs", "127", "24000", "750", "2", "55.7", "9.5 / 25.0"]
    assert cells["full"][8] == f"18.1 / 40.0 ({report.OWN})" and cells["full"][11] == "1 x 3"
    assert cells["scratch"][2] == "-" and cells["scratch"][11] == "- x 2"


def test_the_baseline_of_each_budget_rule_is_its_own(table: pd.DataFrame) -> None:
    rows = runs("full", "same_iterations", 18.0, 1000, [0.40]) + runs("250pc", "same_iterations", 15.8, 1000, [0.30])
    both = report.summarize(pd.concat([pd.DataFrame(rows), pd.DataFrame(runs("full", "same_epochs", 18.1, 1000,
                                                                             [0.37]))]), EXP)
    deltas = both.set_index(["budget", "set"])["delta"]
    assert deltas[("same_iterations", "250pc")] == pytest.approx(-0.10) and deltas[("same_epochs", "full")] == 0


def test_a_deterministic_linear_probe_says_its_transfer_spread_is_zero() -> None:
    frame = pd.DataFrame(runs("full", "same_epochs", 18.1, 1000, [0.37, 0.37, 0.37], protocol="linear"))
    table = report.summarize(frame, EXP)
    assert table["score_std"].iloc[0] == pytest.approx(0, abs=1e-12)
    assert any("linear probe is deterministic" in n for n in report.warnings(table, EXP))


@pytest.mark.parametrize("kind", ["line", "bar"])
def test_figure_draws_each_budget_rule(table: pd.DataFrame, tmp_path, kind: str) -> None:
    from imnet_ablate import figure

    other = runs("full", "same_iterations", 18.0, 1000, [0.40]) + runs("250pc", "same_iterations", 15.8, 1000, [0.3])
    both = pd.concat([table, report.summarize(pd.DataFrame(other), EXP)], ignore_index=True)
    figure.plot(both, OmegaConf.merge(EXP, {"plot": kind, "x": "images"}), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("paper", [None, {}])
def test_an_experiment_quoting_no_paper_numbers_has_no_paper_changes(paper) -> None:
    """A user's own experiment file may leave out ``paper:``: the report shows no paper column instead of failing."""
    exp = OmegaConf.create({"baseline": "full", "paper": paper})
    assert report.paper_changes(exp, "PASCAL-DET") == {}
    quoted = OmegaConf.create({"baseline": "full", "paper": {"PASCAL-DET": {"full": 58.3, "250pc": 54.6}}})
    assert report.paper_changes(quoted, "PASCAL-DET") == {"full": (0.0, False), "250pc": (pytest.approx(-3.7), False)}


def test_a_change_carries_its_standard_error_and_one_within_two_is_warned() -> None:
    """full 0.70/0.74/0.72 (std 0.02) against 500pc 0.73/0.74/0.75 (std 0.01): Δ +0.02, standard error
    sqrt(0.02²/3 + 0.01²/3) = 0.0129, so +2.0 ± 1.3 is not told apart from the baseline; 250pc's -10.0 is."""
    frame = pd.DataFrame(runs("full", "same_iterations", 80.0, 1000, [0.70, 0.74, 0.72])
                         + runs("500pc", "same_iterations", 78.0, 1000, [0.73, 0.74, 0.75])
                         + runs("250pc", "same_iterations", 70.0, 1000, [0.61, 0.62, 0.63])
                         + runs("wordnet-127", "same_iterations", 70.0, 127, [0.70]))
    exp = OmegaConf.merge(EXP, {"sets": [{"label": "full"}, {"label": "500pc"}, {"label": "250pc"},
                                         {"label": "wordnet-127"}]})
    table = report.summarize(frame, exp)
    errors = table.set_index("set")["delta_se"]
    assert errors["500pc"] == pytest.approx(math.sqrt(0.02 ** 2 / 3 + 0.01 ** 2 / 3))
    assert math.isnan(errors["full"]) and math.isnan(errors["wordnet-127"])  # the baseline; a single run
    lines = report.markdown_table(table).splitlines()[2:]
    cells = {line.split(" | ")[1]: line.strip("|").split("|") for line in lines}
    assert cells["500pc"][12].strip() == "+2.0 ± 1.3" and cells["wordnet-127"][12].strip() == "-2.0"
    notes = [n for n in report.warnings(table, exp) if "standard errors" in n]
    assert notes == ["voc-det (same_iterations): 500pc +2.0 ± 1.3 within two standard errors of 0: these runs do "
                     "not tell them from the baseline (more transfer_seeds=N or pretrain_seeds=N narrow the error)"]


def test_runs_that_cannot_differ_give_no_standard_error() -> None:
    frame = pd.DataFrame(runs("full", "same_iterations", 80.0, 1000, [0.504] * 3, protocol="linear")
                         + runs("250pc", "same_iterations", 70.0, 1000, [0.493] * 3, protocol="linear"))
    table = report.summarize(frame, EXP)
    assert table["delta_se"].isna().all()
    assert not any("standard errors" in n for n in report.warnings(table, EXP))


def test_machine_says_where_a_stage_was_computed_or_that_it_was_not_recorded(tmp_path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, numerics in ((old, {}), (new, {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 2})):
        folder.mkdir()
        (folder / "stage.json").write_text(json.dumps({"provenance": {"torch": "2.14.1", **numerics}}))
    assert report.machine(old) == "not recorded (torch 2.14.1)"
    (old / "stage.json").unlink()
    assert report.machine(old) == "not recorded (torch ?)"
    assert report.machine(new) == "AMD EPYC (AVX2), 2 threads, torch 2.14.1"
    gpu = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 16, "gpu": "NVIDIA H200", "cuda": "12.8",
           "cudnn": 91002}
    (new / "stage.json").write_text(json.dumps({"provenance": {"torch": "2.11.0", **gpu}}))
    assert report.machine(new) == "NVIDIA H200 (CUDA 12.8, cuDNN 91002), torch 2.11.0"
