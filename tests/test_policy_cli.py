"""`safeguard policy list/show/diff/check`: read and compare deployments without loading a model."""

from __future__ import annotations

import yaml
from _tiny import policy_v2, write_tiny_pack
from typer.testing import CliRunner

from safeguard.cli import app

runner = CliRunner()


def test_show_prints_each_categorys_response_sensitivity_threshold_and_rates(tmp_path):
    pack = write_tiny_pack(tmp_path / "pack")
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(policy_v2(cyber={"sensitivity": "strict", "note": "why"}, fraud={"response": "off"})))
    out = runner.invoke(app, ["policy", "show", str(f), "--pack", str(pack)])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("cyber"))
    assert line.split()[:6] == ["cyber", "refuse", "strict", "-1.000", "5.0%", "90.0%"] and line.rstrip().endswith("why")
    assert next(x for x in out.output.splitlines() if x.startswith("fraud")).split()[:2] == ["fraud", "off"]
    js = runner.invoke(app, ["policy", "show", str(f), "--pack", str(pack), "--json"])
    assert '"threshold": -1.0' in js.output and '"pack": "tiny-pack"' in js.output


def test_diff_says_what_changes_in_words_and_numbers(tmp_path):
    pack = write_tiny_pack(tmp_path / "pack")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(policy_v2()))
    b.write_text(yaml.safe_dump({"schema_version": 2, "name": "b", "version": "2", "extends": "a.yaml",
                                 "categories": {"cyber": {"sensitivity": "relaxed"}, "fraud": {"response": "block", "message": "No."}}}))
    out = runner.invoke(app, ["policy", "diff", str(a), str(b), "--pack", str(pack)])
    assert out.exit_code == 0, out.output
    assert "cyber: sensitivity standard -> relaxed (threshold -1.000 -> 1000000000.000; measured FPR 1.0% -> 0.0%, recall 50.0% -> 10.0%)" in out.output
    assert 'fraud: response refuse -> block; message "No."' in out.output
    same = runner.invoke(app, ["policy", "diff", str(a), str(a), "--pack", str(pack)])
    assert "no difference in behaviour" in same.output


def test_check_exit_codes_are_usable_in_ci(tmp_path):
    pack = write_tiny_pack(tmp_path / "pack", redirect=False)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(policy_v2()))
    bad.write_text(yaml.safe_dump(policy_v2(cyber={"response": "redirect"})))
    ok = runner.invoke(app, ["policy", "check", str(good), "--pack", str(pack)])
    assert ok.exit_code == 0 and ok.output.startswith("ok")
    fail = runner.invoke(app, ["policy", "check", str(good), str(bad), "--pack", str(pack)])
    assert fail.exit_code == 1 and "FAIL" in fail.output and "ships no redirect vectors" in fail.output
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**policy_v2(), "categoires": {}}))
    assert runner.invoke(app, ["policy", "check", str(typo), "--pack", str(pack)]).exit_code == 1


def test_list_and_the_shipped_policies():
    out = runner.invoke(app, ["policy", "list"])
    assert out.exit_code == 0, out.output
    for name in ("default", "eu", "us", "llama-3-8b-it-res-jh"):
        assert name in out.output
    assert runner.invoke(app, ["policy", "check", "default", "eu", "--pack", "llama-3-8b-it-res-jh"]).exit_code == 0
    assert runner.invoke(app, ["policy", "check", "us", "--pack", "llama-3-8b-it-res-jh"]).exit_code == 1  # no redirect vectors ship for it
