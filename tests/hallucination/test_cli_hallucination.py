"""`notelab hallucination detect|bench|serve-check` end to end on a tiny run folder (and a real `notelab lm
serve` for serve-check): outputs, recorded failures, one-line errors with exit 2."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from notelab.cli import main
from notelab.data.tokenizer import Tokenizer
from notelab.lm.config import LlamaConfig
from notelab.lm.model import Llama

TEXTS = ["def wrap(text, width=70, **kwargs):\n    return text\n", "The sky is blue. Grass is green."] * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, multiple_of=16,
                              max_seq_len=512))  # fmt: skip
    folder = tmp_path_factory.mktemp("run") / "tiny"
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def _rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_detect_writes_one_line_per_row_and_records_failures(run_dir, tmp_path, capsys):
    rows = _rows(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "Q: sky?\nA:", "response": " The sky is blue. Grass is red.", "samples": ["The sky is blue."]},
            {"prompt": "def ", "response": "wrap(text)"},  # samples drawn by the model
            {"prompt": "x", "response": ""},  # nothing to score: recorded, the batch goes on
        ],
    )
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "facts.txt").write_text("The sky is blue.\n\nGrass is green.\n")
    out = tmp_path / "scores.jsonl"
    code = main(["hallucination", "detect", "--input", str(rows), "--checkpoint", str(run_dir), "--device", "cpu",
                 "--detectors", "uncertainty,ngram,factscore", "--knowledge", str(kb), "--samples", "2",
                 "--max-new-tokens", "6", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 3
    first = results[0]
    assert len(first["avg_nll"]["sentence_scores"]) == 2 and first["avg_nll"]["passage_score"] > 0
    assert first["ngram_max"]["sentence_scores"][1] >= first["ngram_max"]["sentence_scores"][0]  # "red" unseen
    assert first["factscore"]["sentence_scores"] == [0.0, 1.0]  # "Grass is red" not in the knowledge
    assert "passage_score" in results[1]["ngram_avg"]
    assert all("failed" in v for v in results[2].values())
    assert "scored 3 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (['{"prompt": "a", "response": "b"}', "{oops"], [], r"rows.jsonl:2: expected a JSON object"),
        (['{"prompt": "a"}'], [], r"rows.jsonl:1: expected a string 'response'"),
        (['{"prompt": "a", "response": "b", "samples": "c"}'], [], r"expected 'samples' as a list"),
        (['{"prompt": "a", "response": "b"}'], ["--detectors", "magic"], r"--detectors: expected"),
        (['{"prompt": "a", "response": "b"}'], ["--detectors", "factscore"], r"expected --knowledge"),
    ],
)
def test_detect_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, lines, args, message):
    rows = _rows(tmp_path / "rows.jsonl", lines)
    out = tmp_path / "o.jsonl"
    code = main(["hallucination", "detect", "--input", str(rows), "--checkpoint", str(run_dir), "--out", str(out),
                 *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_bench_stdlib_facts_truthfulqa_and_halueval(run_dir, tmp_path, capsys):
    base = ["hallucination", "bench", "--checkpoint", str(run_dir), "--device", "cpu"]
    assert main([*base, "--task", "stdlib-facts", "--n", "4", "--max-new-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["questions"] == 4 and 0 <= report["hallucination_rate"] <= 1
    tqa = tmp_path / "mc_task.json"
    tqa.write_text(json.dumps([{"question": "Sky?", "mc1_targets": {"blue": 1, "red": 0},
                                "mc2_targets": {"blue": 1, "grey": 1, "red": 0}}]))  # fmt: skip
    out = tmp_path / "r.json"
    assert main([*base, "--task", "truthfulqa", "--data", str(tqa), "--primer", "none", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["questions"] == 1 and report["mc1"] in (0.0, 1.0) and 0 < report["mc2"] < 1
    capsys.readouterr()
    halu = _rows(tmp_path / "h.json", [
        {"ID": str(i), "user_query": "q", "chatgpt_response": "The sky is blue." * (i + 1),
         "hallucination": "yes" if i % 2 else "no"} for i in range(4)
    ])  # fmt: skip
    assert main([*base, "--task", "halueval", "--data", str(halu)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 4 and 0 <= report["avg_nll"]["auc_pr"] <= 1 and report["avg_nll"]["random"] == 0.5
    assert main([*base, "--task", "truthfulqa"]) == 2
    assert "expected --data" in capsys.readouterr().err


def test_serve_check_dead_endpoint_is_one_line_within_the_timeout(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["hallucination", "serve-check", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                 "--timeout", "0.5", "--n", "2"])  # fmt: skip
    assert code == 2 and time.perf_counter() - t0 < 15
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_serve_check_against_notelab_lm_serve(run_dir, capsys):
    cmd = [sys.executable, "-m", "notelab", "lm", "serve", "--checkpoint", str(run_dir), "--device", "cpu",
           "--port", "0", "--log-level", "warning", "--max-batch", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stdout.read()
        url = line.split(" at ")[-1].strip()
        code = main(["hallucination", "serve-check", "--base-url", url, "--model", "tiny", "--checkpoint",
                     str(run_dir), "--device", "cpu", "--n", "3", "--max-new-tokens", "4"])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads(captured.out)
        assert report["parity"]["greedy_text_equal"] and report["parity"]["max_logprob_diff"] < 1e-3
        assert report["questions"] == 3
    finally:
        proc.terminate()
        proc.wait(10)


def test_knowledge_writes_the_stdlib_source_and_refuses_a_file(tmp_path, capsys):
    assert main(["hallucination", "knowledge", "--out", str(tmp_path / "kb"), "--split", "val"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "kb" / "stdlib_knowledge.jsonl").read_text().splitlines()]
    assert rows and all("def " in r["text"] and r["source"] for r in rows)
    assert f"wrote {len(rows)} passages" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["hallucination", "knowledge", "--out", str(tmp_path / "file")]) == 2
    assert "expected a folder" in capsys.readouterr().err
