"""`fedlens run` refuses what only a simulation may do, before it reaches any server."""

from __future__ import annotations

from fedlens.ops.cli import main


def test_a_deployment_run_refuses_simulated_attackers(tmp_path, capsys):
    code = main(
        ["run", "--state-dir", str(tmp_path / "server"), "--out", str(tmp_path / "run"), "--set", "attack=nan", "--set", "attack-sites=1"]
    )
    assert code == 2
    assert "for simulations only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
