"""benchmarks/adapt_probe_curve.py: the joint probe's dev curve and lambda's slopes during one adapt run."""
from __future__ import annotations

import json
import sys


def test_curves_are_read_at_each_phase_and_the_run_is_the_plain_one(load_benchmark, monkeypatch, capsys,
                                                                    student_ckpt, synth_corpus, tmp_path):
    from ofactl.adapt import AdaptConfig, run_adapt
    from ofactl.config import load_config

    bench = load_benchmark("adapt_probe_curve")
    settings = ["epochs=4", "batch_size=8", "final_probe=joint", "lambda_warmup=0.25", "refine=0.25"]
    argv = ["adapt_probe_curve.py", "--ckpt", str(student_ckpt[0]), "--corpus", str(synth_corpus), "--task", "sid",
            "--every", "1", "--fractions", "0,0.5,1", "--out", str(tmp_path / "watched")]
    monkeypatch.setattr(sys, "argv", [*argv, *(x for kv in settings for x in ("--set", kv))])
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    at = [c["at"] for c in doc["curves"]]
    assert at[:2] == ["start of warmup", "start of joint"] and at[-2:] == ["start of refine", "end"]
    assert any(a.startswith("joint step") for a in at)
    for c in doc["curves"]:
        rates = [r["rate"] for r in c["rows"]]
        assert rates[0] == 1.0 and rates[0] > rates[1] > rates[2]  # lambda 0 keeps every frame
        assert all(0 <= r["expected_error"] <= 1 and 0 <= r["error"] <= 1 for r in c["rows"])
    assert 1 <= len(doc["slopes"]) <= 8 and all(0 <= s["positive_share"] <= 1 for s in doc["slopes"])
    # watching changes nothing: the same settings without the script learn the same rate
    plain = run_adapt(load_config(AdaptConfig, "adapt", None, [*settings, "task=sid"]), student_ckpt[0], synth_corpus,
                      tmp_path / "plain")
    assert plain.learned_rate == doc["learned_rate"] and plain.test == doc["test"]


def test_crossfit_has_no_single_joint_probe_and_is_refused_before_the_run(load_benchmark, monkeypatch, tmp_path):
    import pytest

    bench = load_benchmark("adapt_probe_curve")
    monkeypatch.setattr(bench, "run_adapt", lambda *a, **k: pytest.fail("adapt ran"))
    monkeypatch.setattr(sys, "argv", ["adapt_probe_curve.py", "--ckpt", str(tmp_path / "s.pt"), "--corpus",
                                      str(tmp_path), "--set", "lambda_data=crossfit"])
    with pytest.raises(SystemExit, match="lambda_data=crossfit has no single joint probe to read on dev"):
        bench.main()
