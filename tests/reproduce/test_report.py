"""The report: checks with their rule and interval, the paper beside ours, settings collapsed; seeds pooled."""

from __future__ import annotations

import pytest

from notelab.core.errors import ConfigError
from notelab.reproduce import combine, parse_seeds, rules
from notelab.reproduce.base import ClaimResult, Figure, PaperNumber, Progress, Table
from notelab.reproduce.report import write_report


def _result(seed: int, values: list[float]) -> ClaimResult:
    check = rules.check("(2) GQA", "2 kv heads: val loss GQA / MHA - 1", "paired; below +2%", values, 0.02,
                        below=True, scale=100, unit="%")  # fmt: skip
    return ClaimResult(
        name="llama",
        title="LLaMA",
        claim="GQA shrinks the cache at little loss.",
        verdict=rules.claim_verdict([check]),
        summary=f"seed {seed}",
        tables=[Table("losses", ["kv", "loss"], [[2, 3.0]])],
        figures=[Figure("curve", "curve.png")],
        settings={"steps": 200, "secret_marker": "raw-settings-here"},
        seconds=3.0,
        checks=[check],
        paper=[PaperNumber("Llama 3 8B heads", "32 / 8", "Llama 3, Table 3", "4 / 2")],
        part_seconds={"(2) GQA": 2.5},
    )


def test_report_shows_rule_interval_paper_and_collapses_settings(tmp_path):
    path = write_report([_result(0, [0.003, 0.004, 0.005])], tmp_path, quick=True, failures={"ddim": "boom"})
    page = path.read_text()
    assert "How the verdict was decided" in page and "paired; below +2%" in page
    assert "95% CI" in page and "n=3" in page
    assert "numbers beside ours" in page and "Llama 3, Table 3" in page and "32 / 8" in page
    details = page[page.index("<details>") : page.index("</details>")]
    assert "raw-settings-here" in details and "(2) GQA 2 s" in details
    assert page.count("raw-settings-here") == 1  # only inside the collapsed block
    assert "failed to run" in page and "boom" in page


def test_combine_pools_seeds_and_keeps_each_runs_verdict():
    runs = [_result(0, [0.003]), _result(1, [0.004]), _result(2, [0.005])]
    assert all(r.verdict == "inconclusive" for r in runs)  # one seed cannot decide a 2% claim
    combined = combine(runs, [0, 1, 2])
    assert combined.verdict == "holds" and combined.seed_verdicts == {0: "inconclusive", 1: "inconclusive",
                                                                      2: "inconclusive"}  # fmt: skip
    assert combined.checks[0].values == [0.003, 0.004, 0.005]
    assert combined.figures[0].path == "seed-0/curve.png" and combined.part_seconds == {"(2) GQA": 7.5}
    assert combined.settings["results"] == ["seed-0/result.json", "seed-1/result.json", "seed-2/result.json"]


def test_report_lists_per_seed_verdicts(tmp_path):
    combined = combine([_result(0, [0.003]), _result(1, [0.004]), _result(2, [0.005])], [0, 1, 2])
    page = write_report([combined], tmp_path, quick=False, failures={}).read_text()
    assert "Each run alone" in page and "seed 2:" in page and "pooled" in page


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    for bad in ("a", "1,1", "-1", "0,,1"):
        with pytest.raises(ConfigError, match="--seed"):
            parse_seeds(bad)


def test_progress_prints_parts_steps_and_times(capsys):
    import sys

    p = Progress("ddim", stream=sys.stderr)
    with p.part("train"):
        p.step(1, 2, "seed 0")
    err = capsys.readouterr().err
    assert "[ddim" in err and "train ..." in err and "train 1/2: seed 0" in err and "train: done in" in err
    assert set(p.seconds) == {"train"}


def test_cli_rejects_bad_seeds_in_one_line_before_running(capsys, tmp_path):
    from notelab.cli import main

    assert main(["reproduce", "ddim", "--seed", "1,1", "--out", str(tmp_path / "r")]) == 2
    assert main(["reproduce", "ddim", "--seeds", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err) and "--seed" in err[0]
    assert not (tmp_path / "r").exists()


def test_progress_says_when_a_part_failed(capsys):
    import sys

    p = Progress("llama", stream=sys.stderr)
    with pytest.raises(RuntimeError), p.part("(2) GQA"):
        raise RuntimeError("boom")
    assert "(2) GQA: failed after" in capsys.readouterr().err and "(2) GQA" in p.seconds
