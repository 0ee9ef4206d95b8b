"""`pacsgw simulate` without matplotlib (the [sim] extra, which boxes do not install): the report and
results.json are written, the charts are not, and both the report and the log say how to get them."""

from __future__ import annotations

import json
import sys

import pytest
from structlog.testing import capture_logs

from agent.sim.replay import ReplayConfig, replay
from agent.sim.report import CHARTS_HINT, write_report
from agent.sim.trace import load_arrays, write_trace
from agent.sim.workload import generate, preset


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "general.tsv"
    write_trace(generate(preset("general", seed=7, days=3, monthly_tb=0.02)), path)
    return load_arrays(path)


def test_report_without_matplotlib_says_how_to_get_the_charts(tiny_trace, tmp_path, monkeypatch) -> None:
    # matplotlib is installed in the test venv (dev pulls in [sim]); None in sys.modules makes its import
    # fail as on a box without it (a venv without it just for this would cost a minute).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg = ReplayConfig(capacity=int(tiny_trace.size.sum()) // 3, warmup_days=1)
    with capture_logs() as logs:
        text = write_report(tiny_trace, cfg, [replay(tiny_trace, "A", cfg)], [], tmp_path)
    assert CHARTS_HINT in text and "pip install 'pacsgw[sim]'" in CHARTS_HINT
    assert (tmp_path / "report.md").read_text() == text
    assert [p.name for p in tmp_path.glob("*.png")] == []
    assert json.loads((tmp_path / "results.json").read_text())["schemes"][0]["scheme"] == "A"
    skipped = [e for e in logs if e["event"] == "simulate_charts_skipped"]
    assert skipped and skipped[0]["log_level"] == "warning" and skipped[0]["install"] == "pip install 'pacsgw[sim]'"
