"""`notelab reproduce peft` end to end on tiny settings (numbers meaningless; the machinery and the
noise-free estimator checks are what is tested)."""

from notelab.reproduce.peft import run


def test_claim_runs_tiny(tmp_path):
    result = run(tmp_path, tiny=True)
    assert result.verdict in ("holds", "does not hold", "inconclusive")
    groups = {c.group: c for c in result.checks}
    memory = [c for c in result.checks if c.group.startswith("full fine-tuning memory")]
    assert len(memory) == 4 and all(c.verdict == "holds" for c in memory)
    assert any("LoRA comes close" in g for g in groups)
    methods = result.tables[1]
    assert [r[0] for r in methods.rows][1:] == ["full", "LoRA r=2", "houlsby", "pfeiffer", "prefix", "prompt", "ia3"]
    assert methods.rows[1][2] == "100%" and all(float(r[2].rstrip("%")) < 100 for r in methods.rows[2:])
    assert (tmp_path / "peft_quality_vs_params.png").is_file()
