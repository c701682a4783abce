"""Pooled runs survive a crash and can be split: a complete seed-K/result.json of the same claim, mode
and seed is read back instead of run again; a corrupt or foreign one is run again with a notice."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import types
from dataclasses import asdict

import pytest

from notelab.core.errors import DataError
from notelab.reproduce import CLAIMS, read_result, reusable, rules, run_seeds
from notelab.reproduce.base import ClaimResult, Figure, PaperNumber, Table
from notelab.reproduce.report import device_name, write_report


@pytest.fixture
def fake(monkeypatch):
    """A claim named "fake" whose run records its seeds, writes a figure and one check per seed."""
    calls: list[tuple[int, bool]] = []

    def run(out_dir, quick=False, seed=0, progress=None):
        calls.append((seed, quick))
        (out_dir / "curve.png").write_bytes(b"png")
        check = rules.check("g", "gap", "below 1", [0.1 + 0.01 * seed], 1.0, below=True)
        return ClaimResult(
            name="fake",
            title="Fake",
            claim="c",
            verdict=rules.claim_verdict([check]),
            summary=f"seed {seed}",
            figures=[Figure("curve", "curve.png")],
            checks=[check],
            seconds=1.5,
        )

    module = types.ModuleType("notelab_test_fake_claim")
    module.run = run
    monkeypatch.setitem(__import__("sys").modules, module.__name__, module)
    monkeypatch.setitem(CLAIMS, "fake", module.__name__)
    return calls


def test_a_killed_pooled_run_resumes_at_the_seed_it_was_on(fake, tmp_path):
    first = run_seeds("fake", tmp_path, [0, 1, 2])
    assert fake == [(0, False), (1, False), (2, False)] and first.verdict == "holds" and first.reused_seeds == []
    saved = read_result(tmp_path / "fake" / "seed-1" / "result.json")
    assert saved.seed == 1 and saved.quick is False and saved.device == device_name()
    (tmp_path / "fake" / "seed-2" / "result.json").unlink()  # killed while seed 2 ran: no result yet
    fake.clear()
    log = io.StringIO()
    again = run_seeds("fake", tmp_path, [0, 1, 2], progress_stream=log)
    assert fake == [(2, False)]  # only the seed that had not finished
    assert again.reused_seeds == [0, 1] and "seeds 0, 1 read from earlier complete runs" in again.summary
    assert [c.values for c in again.checks] == [c.values for c in first.checks] and again.verdict == first.verdict
    assert log.getvalue().count("reusing the complete run") == 2
    page = write_report([again], tmp_path, quick=False, failures={}).read_text()
    assert "Seeds 0, 1 read from complete earlier runs" in page


def _corrupt(kind: str, path):
    data = json.loads(path.read_text())
    if kind == "truncated":
        path.write_text(path.read_text()[:40])
    elif kind == "not utf-8":
        path.write_bytes(b"\xff\xfe{" + path.read_bytes())
    elif kind == "foreign json":
        path.write_text(json.dumps({"model": "llama", "steps": 5}))
    elif kind == "a list":
        path.write_text("[1, 2]")
    elif kind == "other claim":
        path.write_text(json.dumps({**data, "name": "ddim"}))
    elif kind == "quick run":
        path.write_text(json.dumps({**data, "quick": True}))
    elif kind == "other seed":
        path.write_text(json.dumps({**data, "seed": 7}))
    elif kind == "no seed recorded":
        path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("seed", "quick")}))
    elif kind == "bad check value":
        data["checks"][0]["values"] = ["x"]
        path.write_text(json.dumps(data))
    elif kind == "bad verdict":
        path.write_text(json.dumps({**data, "verdict": "maybe"}))
    elif kind == "missing figure":
        (path.parent / "curve.png").unlink()
    elif kind == "figure outside":
        path.write_text(json.dumps({**data, "figures": [{"title": "t", "path": "../seed-0/curve.png"}]}))
    else:
        raise AssertionError(kind)


KINDS = ["truncated", "not utf-8", "foreign json", "a list", "other claim", "quick run", "other seed",
         "no seed recorded", "bad check value", "bad verdict", "missing figure", "figure outside"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_or_foreign_result_is_run_again_with_a_notice(fake, tmp_path, kind):
    run_seeds("fake", tmp_path, [0, 1])
    _corrupt(kind, tmp_path / "fake" / "seed-1" / "result.json")
    fake.clear()
    log = io.StringIO()
    result = run_seeds("fake", tmp_path, [0, 1], progress_stream=log)
    assert fake == [(1, False)] and result.reused_seeds == [0]
    notices = [line for line in log.getvalue().splitlines() if "not reusing" in line]
    assert len(notices) == 1 and "[fake seed 1]" in notices[0] and "running it again" in notices[0]
    assert read_result(tmp_path / "fake" / "seed-1" / "result.json").seed == 1  # rewritten whole


def test_a_full_run_does_not_reuse_quick_results(fake, tmp_path):
    run_seeds("fake", tmp_path, [0, 1], quick=True)
    fake.clear()
    run_seeds("fake", tmp_path, [0, 1], quick=False)
    assert fake == [(0, False), (1, False)]


def test_seeds_run_apart_pool_side_by_side_with_their_own_device(fake, tmp_path):
    for k in (0, 1):  # e.g. two processes or machines: `notelab reproduce fake --seed K --out R_K`
        run_seeds("fake", tmp_path / f"R_{k}", [k])
        path = tmp_path / f"R_{k}" / "fake" / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "device": "NVIDIA H200"}))
        shutil.copytree(tmp_path / f"R_{k}" / "fake", tmp_path / "R" / "fake" / f"seed-{k}")
    fake.clear()
    pooled = run_seeds("fake", tmp_path / "R", [0, 1])
    assert fake == [] and pooled.reused_seeds == [0, 1] and pooled.device == "NVIDIA H200"
    assert pooled.checks[0].values == [0.1, 0.11] and pooled.seed_verdicts == {0: "inconclusive", 1: "inconclusive"}
    page = write_report([pooled], tmp_path / "R", quick=False, failures={}).read_text()
    meta = page[page.index('<p class="meta">') :].split("</p>")[0]
    assert "NVIDIA H200" in meta and "this machine" not in meta
    again = read_result(tmp_path / "R" / "fake" / "result.json")  # the pooled result reads back too
    assert again.seed is None and again.seed_verdicts == pooled.seed_verdicts and again.reused_seeds == [0, 1]


def test_pooled_devices_name_each_machine_with_its_seeds(fake, tmp_path):
    run_seeds("fake", tmp_path, [0, 1, 2])
    path = tmp_path / "fake" / "seed-2" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "device": "NVIDIA H200"}))
    pooled = run_seeds("fake", tmp_path, [0, 1, 2])
    assert pooled.device == f"{device_name()} (seeds 0, 1); NVIDIA H200 (seed 2)"


def _full_result() -> ClaimResult:
    one = rules.check("g", "one value", "below 1", [0.5], 1.0, below=True)  # interval -inf..inf
    nan = rules.check("g", "diverged", "below 1", [math.nan, 0.2], 1.0, below=True, option="b")
    return ClaimResult(
        name="llama",
        title="T",
        claim="c",
        verdict="inconclusive",
        summary="s",
        tables=[Table("t", ["a", "b"], [[1, 2.5], ["x", None]], note="n")],
        figures=[Figure("f", "f.png", "cap")],
        settings={"steps": 3, "nested": {"a": [1, 2]}},
        seconds=2.0,
        checks=[one, nan],
        paper=[PaperNumber("q", "1", "src", "2")],
        part_seconds={"p": 1.0},
        seed_verdicts={0: "holds", 3: "inconclusive"},
        seed=None,
        quick=True,
        device="NVIDIA H200",
        reused_seeds=[3],
        resumed_pieces=7,
    )


def test_from_dict_round_trips_through_json_with_infinite_intervals(tmp_path):
    r = _full_result()
    path = tmp_path / "result.json"
    path.write_text(json.dumps(asdict(r), indent=2))
    back = read_result(path)
    assert back.checks[0].low == -math.inf and back.checks[0].verdict == "inconclusive"
    assert math.isnan(back.checks[1].values[0]) and back.checks[1].verdict == "inconclusive"
    assert back.seed_verdicts == {0: "holds", 3: "inconclusive"}
    assert (back.tables, back.figures, back.paper, back.settings) == (r.tables, r.figures, r.paper, r.settings)
    assert (back.device, back.quick, back.seed, back.reused_seeds) == ("NVIDIA H200", True, None, [3])
    assert back.resumed_pieces == 7


def test_from_dict_recomputes_a_tampered_verdict():
    data = asdict(_full_result())
    data["checks"][0] |= {"values": [0.1, 0.2, 0.15], "verdict": "does not hold", "mean": 99.0}
    c = ClaimResult.from_dict(data).checks[0]
    assert c.verdict == "holds" and c.mean == pytest.approx(0.15)


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda d: d.pop("name"), "name"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(seconds="3"), "seconds"),
        (lambda d: d.update(seed=-1), "seeds >= 0"),
        (lambda d: d.update(resumed_pieces=-2), "resumed_pieces"),
        (lambda d: d.update(resumed_pieces=1.5), "resumed_pieces"),
        (lambda d: d.update(seed_verdicts={"x": "holds"}), "seed_verdicts"),
        (lambda d: d.update(seed_verdicts={"0": "maybe"}), "seed_verdicts"),
        (lambda d: d.update(checks={}), "checks"),
        (lambda d: d["checks"][0].update(role="votes"), "role"),
        (lambda d: d["checks"][0].pop("limit"), "limit"),
        (lambda d: d["tables"][0].update(rows="r"), "rows"),
        (lambda d: d["figures"].append(5), "figures[1]"),
        (lambda d: d["paper"][0].update(source=3), "source"),
    ],
)
def test_from_dict_rejects_bad_fields_in_one_line(edit, where):
    data = json.loads(json.dumps(asdict(_full_result())))
    edit(data)
    with pytest.raises(DataError) as e:
        ClaimResult.from_dict(data)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_reusable_says_nothing_when_there_is_no_result(tmp_path):
    assert reusable(tmp_path, "fake", False, 0) == (None, "")


def test_cli_runs_seeds_apart_then_pools_them_without_running(fake, tmp_path, capsys):
    from notelab.cli import main

    for k in (0, 1):
        assert main(["reproduce", "fake", "--seed", str(k), "--out", str(tmp_path / f"R_{k}")]) == 0
        (tmp_path / "R" / "fake").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"R_{k}" / "fake").rename(tmp_path / "R" / "fake" / f"seed-{k}")
    fake.clear()
    capsys.readouterr()
    assert main(["reproduce", "fake", "--seed", "0,1,2", "--out", str(tmp_path / "R"), "--pool"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed-2 (no result.json)" in err[0] and fake == []  # nothing ran
    assert not (tmp_path / "R" / "fake" / "result.json").exists()
    assert main(["reproduce", "fake", "--seed", "0,1", "--out", str(tmp_path / "R"), "--pool"]) == 0
    assert fake == [] and "Seeds 0, 1 read from complete earlier runs" in (tmp_path / "R" / "index.html").read_text()
    assert main(["reproduce", "fake", "--seed", "3", "--pool", "--out", str(tmp_path / "R")]) == 2
    assert "--pool: expected at least two seeds" in capsys.readouterr().err


def test_the_claims_own_checks_read_back_as_judged(tmp_path):
    """The checks the full claims decide by (built by their own rule functions, every role, exact and
    interval, non-finite intervals) survive result.json as written by a run, verdicts included."""
    from notelab.reproduce import ddim, llama, transformer_vs_rnn

    fds = {"ddpm": [10.0, 11.0, 9.5], **{f"ddim eta=0 S={S}": [9.0 + S / 100, 10.0, 9.0] for S in (20, 50, 100)}}
    secs = {"ddpm": [2.0, 2.1, 2.0], **{f"ddim eta=0 S={S}": [S / 1000, S / 990, S / 1010] for S in (20, 50, 100)}}
    rates = {"transformer": [[1.0, 4.0], [1.1, 4.2]], "lstm": [[1.0, 1.5], [1.0, 1.4]], "gru": [[1.0, 1.2], [1.0, 1.3]]}
    checks = [
        *ddim.decide(fds, secs, ddim.FULL),
        *transformer_vs_rnn.throughput_checks(rates, [32, 1024], 6, decides=False),
        transformer_vs_rnn.gradient_check({"rnn": [-0.5, -0.6], "lstm": [-0.1, -0.2], "gru": [-0.1, -0.1]}),
        *llama.block_checks([3.5], [3.8]),  # one seed: interval -inf..+inf
        *llama.gqa_checks([3.5, 3.6], {2: [3.52, 3.61]}, {2: 4.0}, 8, 0.02),
        *llama.long_checks({1: [30.0, 31.0], 2: [40.0, 42.0]}, {1: [30.0, 31.0], 2: [33.0, 35.0]}, 0.01),
        *llama.dpo_checks([0.1, 0.2, -0.1], [0.5, 0.1, 0.3]),
    ]
    r = dataclasses.replace(_full_result(), checks=checks, verdict=rules.claim_verdict(checks))
    path = tmp_path / "result.json"
    path.write_text(json.dumps(asdict(r), indent=2, default=str) + "\n")  # as _run_into writes it
    back = read_result(path)
    assert len(back.checks) == len(checks) >= 12
    for a, b in zip(back.checks, checks):
        assert (a.name, a.role, a.exact, a.option, a.values, a.verdict) == (b.name, b.role, b.exact, b.option,
                                                                            b.values, b.verdict)  # fmt: skip
        assert a.interval_text() == b.interval_text()
    assert back.verdict == r.verdict and rules.claim_verdict(back.checks) == r.verdict


def test_a_rerun_that_dies_leaves_no_stale_result_to_reuse(fake, tmp_path, monkeypatch):
    run_seeds("fake", tmp_path, [0, 1], quick=True)
    module = __import__("sys").modules[CLAIMS["fake"]]
    good = module.run

    def dies(out_dir, quick=False, seed=0, progress=None):
        (out_dir / "curve.png").write_bytes(b"half a full run's figure")
        raise RuntimeError("killed")

    monkeypatch.setattr(module, "run", dies)
    with pytest.raises(RuntimeError):
        run_seeds("fake", tmp_path, [0, 1], quick=False)  # the full run dies in seed 0
    assert not (tmp_path / "fake" / "seed-0" / "result.json").exists()  # the quick one no longer matches
    monkeypatch.setattr(module, "run", good)
    fake.clear()
    run_seeds("fake", tmp_path, [0, 1], quick=True)
    assert fake == [(0, True)]  # seed 0 runs again; seed 1's untouched quick result is reused
