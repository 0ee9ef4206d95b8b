"""`pacsgw import-trace`: CSV, the agent's audit log and xferlog into a replayable trace; bad rows named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audit import AuditLog, Who
from agent.cli import main
from agent.sim.importer import TraceImportError, import_trace
from agent.sim.trace import check_replayable, iter_requests, load_arrays, read_header
from agent.sim.workload import DAY

CSV_ROWS = """ts,op,path,size,patient,study,modality,dept
90000,read,CT/ST1/SE1/1.dcm,100,P1,ST1,CT,ED
3600,write,CT/ST1/SE1/1.dcm,100,P1,ST1,CT,ED
3600,write,CT/ST1/SE1/2.dcm,200,P1,ST1,CT,ED
7200,frobnicate,CT/ST1/SE1/3.dcm,300,P1,ST1,CT,ED
7300,write,CT/ST1/SE1/3.dcm,-4,P1,ST1,CT,ED
7400,write,CT/ST1/SE1/4.dcm,12,P1,ST1
7500,write,../etc/passwd,12,P1,ST1,CT,ED
soon,read,CT/ST1/SE1/1.dcm,100,P1,ST1,CT,ED
100000,read,MR/ST0/SE1/1.dcm,5000,P1,ST0,MR,ED
100001,read,CT/ST1/SE1/2.dcm,999,P1,ST1,CT,ED
200000,write,MR/ST0/SE1/1.dcm,5000,P1,ST0,MR,ED
200001,write,CT/ST1/SE1/2.dcm,200,P1,ST1,CT,ED
3600,read,CT/ST1/SE1/2.dcm,200,P1,ST1,CT,ED
"""


def test_csv_any_order_bad_rows_named_and_repaired(tmp_path: Path) -> None:
    src, dst = tmp_path / "month.csv", tmp_path / "month.tsv"
    src.write_text(CSV_ROWS)
    s = import_trace(src, dst, start="2026-03-02")
    assert [(b.line, b.reason.split(" ")[0]) for b in s.bad] == [
        (5, "op"), (6, "size"), (7, "6"), (8, "path"), (9, "ts")]
    assert "line 5: op 'frobnicate' is neither read nor write" in s.text()
    assert "line 7: 6 fields, the header has 8" in s.text()
    assert s.read_before_write == 1          # MR/ST0/SE1/1.dcm read at 100000, written at 200000
    assert s.rewrites == 2                   # that write, and the second write of 2.dcm
    assert s.sizes_fixed == 1                # the read of 2.dcm with 999 bytes
    reqs = list(iter_requests(dst))
    assert [(r.t, r.op, r.path, r.size) for r in reqs] == [
        (3600.0, "W", "CT/ST1/SE1/1.dcm", 100), (3600.0, "W", "CT/ST1/SE1/2.dcm", 200),
        (3600.0, "R", "CT/ST1/SE1/2.dcm", 200), (90000.0, "R", "CT/ST1/SE1/1.dcm", 100),
        (100000.0, "R", "MR/ST0/SE1/1.dcm", 5000), (100001.0, "R", "CT/ST1/SE1/2.dcm", 200)]
    assert read_header(dst)["start"] == "2026-03-02"
    ta = load_arrays(dst, cache=False)
    check_replayable(ta)
    # the study written on day 0, the one only read: in the archive before the trace (day -1)
    assert sorted(ta.study_day.tolist()) == [-1, 0]
    assert sorted(ta.dir_names) == ["CT/2026-03-02", "MR/2026-03-01"]


def test_csv_without_optional_columns_derives_the_study(tmp_path: Path) -> None:
    src = tmp_path / "plain.csv"
    src.write_text("path,size,op,ts\n/a/ST9/SE1/1.dcm,10,write,5\n/a/ST9/SE2/1.dcm,10,write,6\n"
                   "/a/ST9/SE1/1.dcm,10,read,7\n")
    import_trace(src, tmp_path / "t.tsv", study_depth=2)     # the agent's [prefetch] study_depth for a/STUDY/...
    reqs = list(iter_requests(tmp_path / "t.tsv"))
    assert {r.study for r in reqs} == {"a/ST9"} and {r.patient for r in reqs} == {"a/ST9"}
    assert {r.modality for r in reqs} == {"OT"}


def test_csv_header_errors_are_clear(tmp_path: Path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("ts,op,path,bytes\n1,write,a/b,1\n")
    with pytest.raises(TraceImportError, match="missing \\['size'\\], unknown \\['bytes'\\]"):
        import_trace(src, tmp_path / "t.tsv", fmt="csv")
    src.write_text("ts,op,path,size\n1,erase,a/b,1\n")
    with pytest.raises(TraceImportError, match="no usable transfer rows"):
        import_trace(src, tmp_path / "t.tsv")
    assert not (tmp_path / "t.tsv").exists()


def test_audit_log_of_the_agent(tmp_path: Path) -> None:
    """Records written by the agent's own AuditLog; a torn line and a failed read are named/skipped."""
    path = tmp_path / "audit.log"
    audit = AuditLog(path, max_bytes=1 << 20, keep=2)
    pacs, viewer = Who("pacs", "ftp", "10.0.0.1:5000"), Who("radiology", "sftp", "10.0.0.2:6000")
    audit.record(pacs, "login", "")
    audit.record(pacs, "store", "/CT/2026-01-05/ST1/SE1/1.dcm", bytes=1000)
    audit.record(pacs, "store", "/CT/2026-01-05/ST1/SE1/2.dcm", "aborted: client went away", 500)
    audit.record(viewer, "list", "/CT/2026-01-05/ST1/SE1")
    audit.record(viewer, "retrieve", "/CT/2026-01-05/ST1/SE1/1.dcm", "ok", 1000, cached=True)
    audit.record(viewer, "retrieve", "/MR/2020-01-01/ST0/SE1/1.dcm", "error: NotFound: gone")
    audit.record(viewer, "retrieve", "/MR/2020-01-01/ST0/SE1/2.dcm", "ok", 4000, cached=False)
    audit.close()
    with path.open("a") as f:
        f.write('{"time": "2026-01-05T10:00:00.000Z", "op": "retrieve", "path": "/x"\n')
    s = import_trace(path, tmp_path / "t.tsv")
    assert s.format == "audit"
    assert [b.line for b in s.bad] == [8] and "not an audit record" in s.bad[0].reason
    assert s.ignored == {"audit login": 1, "audit list": 1, "audit store not ok": 1, "audit retrieve not ok": 1}
    reqs = list(iter_requests(tmp_path / "t.tsv"))
    assert [(r.op, r.path, r.size, r.department) for r in reqs] == [
        ("W", "CT/2026-01-05/ST1/SE1/1.dcm", 1000, "pacs"), ("R", "CT/2026-01-05/ST1/SE1/1.dcm", 1000, "radiology"),
        ("R", "MR/2020-01-01/ST0/SE1/2.dcm", 4000, "radiology")]
    first_day = json.loads(path.read_text().splitlines()[0])["time"][:10]
    assert read_header(tmp_path / "t.tsv")["start"] == first_day and 0 <= reqs[0].t < DAY


XFERLOG = """Mon Jan  5 08:00:10 2026 2 10.0.0.1 524288 /CT/2026-01-05/ST1/SE1/00001.dcm b _ i r pacs ftp 0 * c
Mon Jan  5 08:00:12 2026 1 10.0.0.1 524288 /CT/2026-01-05/ST1/SE1/00002.dcm b _ i r pacs ftp 0 * i
Mon Jan  5 09:30:00 2026 4 10.0.0.7 524288 /CT/2026-01-05/ST1/SE1/00001.dcm b _ o r viewer ftp 0 * c
Mon Jan  5 09:31:00 2026 0 10.0.0.7 77 /reports/Study One.txt a _ o r viewer ftp 0 * c
garbage line
Mon Jan 32 09:31:00 2026 0 10.0.0.7 77 /x b _ o r viewer ftp 0 * c
Tue Jan  6 07:00:00 2026 1 10.0.0.7 9 /CT/old/1.dcm b _ d r viewer ftp 0 * c
Tue Jan  6 07:00:00 2026 1 10.0.0.7 9 /CT/old/1.dcm b _ x r viewer ftp 0 * c
"""


def test_xferlog_vsftpd(tmp_path: Path) -> None:
    src = tmp_path / "xferlog"
    src.write_text(XFERLOG)
    s = import_trace(src, tmp_path / "t.tsv")
    assert s.format == "xferlog"
    assert [(b.line, b.reason) for b in s.bad] == [
        (5, "2 fields, an xferlog line has at least 18"),
        (6, "time 'Mon Jan 32 09:31:00 2026' is not `Mon Nov 30 21:12:14 2026`"),
        (8, "direction 'x' is not i, o or d")]
    assert s.ignored == {"xferlog incomplete transfer": 1, "xferlog delete": 1}
    reqs = list(iter_requests(tmp_path / "t.tsv"))
    # request time = log time - transfer time, from midnight of the first day
    assert [(r.t, r.op, r.path) for r in reqs] == [
        (8 * 3600 + 8, "W", "CT/2026-01-05/ST1/SE1/00001.dcm"),
        (9.5 * 3600 - 4, "R", "CT/2026-01-05/ST1/SE1/00001.dcm"),
        (9.5 * 3600 + 60, "R", "reports/Study One.txt")]
    assert read_header(tmp_path / "t.tsv")["start"] == "2026-01-05"


def test_an_xferlog_user_with_a_control_character_is_a_bad_row(tmp_path: Path) -> None:
    """Named and skipped, as in a CSV or an audit log; it stopped the whole import (ValueError out of import_trace)."""
    src = tmp_path / "xferlog"
    lines = XFERLOG.splitlines()
    src.write_text(lines[0] + "\n" + lines[2].replace(" viewer ", " vie\x01wer ") + "\n")
    s = import_trace(src, tmp_path / "t.tsv")
    assert [(b.line, b.reason) for b in s.bad] == [(2, "user 'vie\\x01wer' has control characters")]
    assert [r.op for r in iter_requests(tmp_path / "t.tsv")] == ["W"]


def _trace_text(rows: list[str]) -> str:
    head = '# pacsgw-trace v1 {"start": "2026-01-05", "days": 1, "layout": null}\n'
    return head + "t\top\tpath\tsize\tpatient\tstudy\tmodality\tdepartment\n" + "".join(r + "\n" for r in rows)


def test_simulate_refuses_an_unrepaired_trace_before_any_scheme(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text(_trace_text(["1.000\tW\ta/s/1\t10\tP\tS\tCT\tED", "2.000\tR\ta/s/1\t10\tP\tS\tCT\tED",
                                "3.000\tW\ta/s/1\t10\tP\tS\tCT\tED"]))
    rc = main(["simulate", str(bad), "--capacity", "1KB", "--no-progress", "--catalog-rows", "0",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "request 3 writes a file that was already written or read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_then_simulate(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(5)
    lines = ["ts,op,path,size,patient,study,modality,dept"]
    for k in range(60):   # 60 studies over 6 days, each read back twice
        day, patient = k // 10, k % 7
        for f in range(3):
            p = f"S{k}/SE1/{f}.dcm"
            lines.append(f"{day * DAY + k * 60 + f},write,{p},{int(rng.integers(1, 5)) * 100_000},"
                         f"P{patient},S{k},CT,ED")
            for _ in range(2):
                lines.append(f"{day * DAY + k * 60 + f + float(rng.uniform(60, 3 * DAY)):.3f},read,{p},0,"
                             f"P{patient},S{k},CT,ED")
    body = [lines[1 + i] for i in rng.permutation(len(lines) - 1)]   # rows in any order
    (tmp_path / "m.csv").write_text("\n".join(lines[:1] + body) + "\n")
    assert main(["import-trace", str(tmp_path / "m.csv"), str(tmp_path / "m.tsv")]) == 0
    out = capsys.readouterr().out
    assert "repaired: 360 reads given their object's size" in out and "bad rows" not in out
    rc = main(["simulate", str(tmp_path / "m.tsv"), "--capacity", "10MB", "--schemes", "A,ours,agent",
               "--reference", "LRU,Belady", "--warmup-days", "1", "--catalog-rows", "0", "--no-progress",
               "--out", str(tmp_path / "r")])
    assert rc == 0
    assert "Cache 10.00 MB;" in capsys.readouterr().out      # in the unit given, not "0.00 TB"
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    lru = {r["algorithm"]: r for r in res["reference"]}["LRU"]
    ours_a = {r["scheme"]: r for r in res["schemes"]}["A"]
    assert [r["default"] for r in res["schemes"]] == [False, False, True]    # the agent's own defaults
    assert ours_a["gap_closed"]["object"] == 0.0                             # LRU closes none of its gap
    assert abs(lru["hit_ratio"] - ours_a["hit_ratio"]) < 0.02


def test_simulate_by_default_reports_the_stack_the_agent_runs_demand_only_and_with_prefetch() -> None:
    """An admin replaying a month with the README's command (no --schemes) must see the stack the box runs, and its
    demand-only twin beside Belady: the default list once stopped at the older `ours` stack."""
    from agent.cli import build_parser
    from agent.sim.replay import DEFAULT_SCHEME, SCHEMES
    schemes = build_parser().parse_args(["simulate", "m.tsv", "--capacity", "3GB"]).schemes.split(",")
    eviction, prefetch = SCHEMES[DEFAULT_SCHEME]
    assert prefetch and DEFAULT_SCHEME in schemes
    assert any(SCHEMES[s] == (eviction, None) for s in schemes), f"no demand-only {eviction} in {schemes}"
    assert set(schemes) <= set(SCHEMES)


rows = st.lists(st.tuples(st.integers(0, 5 * 86400), st.booleans(), st.integers(0, 12), st.integers(0, 3)),
                min_size=1, max_size=60)


@settings(max_examples=30, deadline=None)
@given(rows)
def test_any_csv_imports_to_a_replayable_trace(tmp_path_factory, data: list) -> None:
    d = tmp_path_factory.mktemp("p")
    text = "ts,op,path,size\n" + "".join(f"{t},{'write' if w else 'read'},s{o % 4}/f{o},{100 + sz}\n"
                                         for t, w, o, sz in data)
    (d / "in.csv").write_text(text)
    s = import_trace(d / "in.csv", d / "t.tsv")
    ta = load_arrays(d / "t.tsv", cache=False)
    check_replayable(ta)
    assert s.reads + s.writes + s.rewrites == len(data) and not s.bad
    assert s.objects == len({o for _, _, o, _ in data})
    # every object keeps one size; every read of it is counted against that size
    assert np.all(ta.size == ta.obj_size[ta.obj])
