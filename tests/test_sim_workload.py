"""The generator is deterministic per seed and its statistics follow its parameters."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest

from agent.sim.trace import iter_requests, load_arrays, read_header, write_trace
from agent.sim.workload import DAY, SHAPES, Generator, WorkloadParams, generate, preset
from bench.catalog_scale import archive_listing


def small(name: str = "general", **kw) -> Generator:
    kw.setdefault("days", 14)
    kw.setdefault("monthly_tb", 0.4)
    return generate(preset(name, **kw))


@pytest.fixture(scope="module")
def gen() -> Generator:
    return small(seed=11)


@pytest.fixture(scope="module")
def onc() -> Generator:
    return small("oncology", seed=12, monthly_tb=0.4)


def new_studies(g: Generator) -> list:
    return [s for s in g.studies if s.day >= 0]


def events(g: Generator, kind: str) -> list:
    return [e for e in g.events if e.kind == kind]


def test_deterministic_per_seed(tmp_path) -> None:
    a, b, c = (small(seed=s, days=3, monthly_tb=0.2) for s in (5, 5, 6))
    write_trace(a, tmp_path / "a.tsv")
    write_trace(b, tmp_path / "b.tsv")
    write_trace(c, tmp_path / "c.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()


def test_trace_file_round_trip(tmp_path) -> None:
    g = small(seed=3, days=4, monthly_tb=0.2)
    meta = write_trace(g, tmp_path / "t.tsv.gz")
    reqs = list(iter_requests(tmp_path / "t.tsv.gz"))
    assert len(reqs) == meta["requests"] > 1000
    times = [r.t for r in reqs]
    assert times == sorted(times) and times[-1] < 4 * DAY
    assert {r.op for r in reqs} == {"R", "W"}
    seen_write: set[str] = set()
    written_size: dict[str, int] = {}
    for r in reqs:
        parts = r.path.split("/")
        assert parts[0] == r.modality and parts[2] == r.study and r.path.endswith(".dcm")
        dt.date.fromisoformat(parts[1])
        if r.op == "W":
            assert r.path not in seen_write, "a file is written once"
            seen_write.add(r.path)
            written_size[r.path] = r.size
        elif r.path in written_size:
            assert written_size[r.path] == r.size, "a re-read file has the size it was written with"
    # reads of a file acquired during the trace never precede its write
    first_op: dict[str, str] = {}
    for r in reqs:
        first_op.setdefault(r.path, r.op)
    for r in reqs:
        if dt.date.fromisoformat(r.path.split("/")[1]) >= dt.date.fromisoformat(g.p.start):
            assert first_op[r.path] == "W"
    assert read_header(tmp_path / "t.tsv.gz")["seed"] == 3
    # the catalog lines list the prior studies and the arrays agree with the text
    ta = load_arrays(tmp_path / "t.tsv.gz")
    assert (ta.study_day < 0).sum() == sum(1 for s in g.studies if s.day < 0)
    assert ta.n == len(reqs) and ta.is_write.sum() == len(seen_write)
    assert np.all(ta.study_day[ta.obj_study[ta.obj[ta.is_write]]] >= 0)


def test_custom_layout(tmp_path) -> None:
    g = small(seed=4, days=2, monthly_tb=0.1, layout="{date}/{modality}/{study}/{series}/{instance}.dcm")
    write_trace(g, tmp_path / "t.tsv")
    r = next(iter_requests(tmp_path / "t.tsv"))
    assert r.path.split("/")[1] == r.modality and r.path.split("/")[0].startswith("2026-")
    ta = load_arrays(tmp_path / "t.tsv")
    for d in ta.dir_names:   # the day-directory is "{date}/{modality}" under this layout
        dt.date.fromisoformat(d.split("/")[0])
        assert d.split("/")[1] in SHAPES
    assert set(ta.modality_names[m] for m in ta.dir_modality()) <= set(SHAPES)
    assert ta.dir_day().max() <= 1
    with pytest.raises(ValueError):
        preset("general", layout="{modality}/{study}/{instance}.dcm")


def test_modality_mix(gen: Generator, onc: Generator) -> None:
    for g in (gen, onc):
        studies = new_studies(g)
        n = len(studies)
        assert n > 400
        total = sum(g.p.modality_mix.values())
        for m, share in g.p.modality_mix.items():
            got = sum(s.modality == m for s in studies) / n
            expected = share / total
            # binomial standard error, 4 sigma
            assert abs(got - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9, m


def test_study_shapes(gen: Generator) -> None:
    by_mod: dict[str, list] = {}
    for s in gen.studies:
        by_mod.setdefault(s.modality, []).append(s)
    ct = by_mod["CT"]
    ct_images = np.array([s.sizes.size for s in ct])
    ct_mb = np.concatenate([s.sizes for s in ct]) / 1e6
    assert 200 <= np.median(ct_images) <= 2000, "CT: hundreds to thousands of slices"
    assert 0.4 <= np.median(ct_mb) <= 0.65, "CT slice ~0.5 MB (512x512x16 bit)"
    for m in ("CR", "DX"):
        imgs = np.array([s.sizes.size for s in by_mod[m]])
        mb = np.concatenate([s.sizes for s in by_mod[m]]) / 1e6
        assert np.median(imgs) <= 6 and 5 <= np.median(mb) <= 30, m
    mr = by_mod["MR"]
    assert np.median([s.sizes.size for s in mr]) >= 150
    assert np.median(np.concatenate([s.sizes for s in mr])) < 0.3e6, "MR: many small images"
    for m, studies in by_mod.items():
        shape = SHAPES[m]
        n_series = [s.n_series for s in studies]
        assert shape.series[0] <= min(n_series) and max(n_series) <= shape.series[1], m


def test_daily_volume_scales_with_monthly_tb() -> None:
    for tb in (0.2, 0.6):
        g = small(seed=21, days=28, monthly_tb=tb)
        written = sum(int(s.sizes.sum()) for s in new_studies(g))
        expected = tb * 1e12 * 28 / (365.25 / 12)
        assert abs(written / expected - 1) < 0.15, (tb, written / expected)


def test_working_hours_share(gen: Generator) -> None:
    p = gen.p
    weekday = [s for s in new_studies(gen) if (gen.start + dt.timedelta(days=s.day)).weekday() < 5]
    hours = np.array([(s.acquired_at % DAY) / 3600 for s in weekday])
    inside = np.mean((hours >= p.work_start_h) & (hours < p.work_end_h))
    # off-hours acquisitions are uniform over the other hours, so none fall inside
    assert abs(inside - p.working_hours_share) < 4 * np.sqrt(0.25 / len(weekday))
    g2 = small(seed=11, working_hours_share=0.3)
    weekday2 = [s for s in new_studies(g2) if (g2.start + dt.timedelta(days=s.day)).weekday() < 5]
    h2 = np.array([(s.acquired_at % DAY) / 3600 for s in weekday2])
    assert np.mean((h2 >= p.work_start_h) & (h2 < p.work_end_h)) < 0.45


def test_weekend_share() -> None:
    for factor in (0.2, 0.6):
        g = small(seed=31, days=28, weekend_factor=factor)
        per_day = np.bincount([s.day for s in new_studies(g)], minlength=28)
        wd = np.array([(g.start + dt.timedelta(days=d)).weekday() for d in range(28)])
        ratio = per_day[wd >= 5].mean() / per_day[wd < 5].mean()
        assert abs(ratio - factor) < 0.1, (factor, ratio)


def test_new_studies_read_within_hours(gen: Generator) -> None:
    acquired = {s.idx: s.acquired_at for s in new_studies(gen)}
    delays = np.array([e.t - acquired[e.study] for e in events(gen, "primary")]) / 3600
    assert np.all(delays > 0)
    assert np.median(delays) < 12, "most new studies are read the same working day"
    ed = [e for e in events(gen, "primary") if gen.studies[e.study].department == "ED"]
    assert np.median([e.t - acquired[e.study] for e in ed]) / 3600 < 2, "ED studies are read fast"


def test_prior_study_reads(gen: Generator, onc: Generator) -> None:
    for g in (gen, onc):
        studies = new_studies(g)
        with_priors = [s for s in studies if any(g.studies[i].acquired_at < s.acquired_at and i != s.idx
                                                 for i in g.history[s.patient])]
        share = len(with_priors) / len(studies)
        assert share >= g.p.returning_share - 4 * np.sqrt(0.25 / len(studies))
        primary = {e.study: e.t for e in events(g, "primary")}
        priors = events(g, "prior")
        for e in priors:
            st = g.studies[e.study]
            # a prior is read together with a later study of the same patient
            near = [p for p, t in primary.items() if g.studies[p].patient == st.patient and 0 < t - e.t < 60]
            assert near, "prior read right before the new study is opened"
        per_new = len(priors) / max(sum(1 for s in with_priors if s.idx in primary), 1)
        lo, hi = g.p.priors_read
        assert lo * 0.8 <= per_new <= hi
    assert len(events(onc, "prior")) / len(new_studies(onc)) > len(events(gen, "prior")) / len(new_studies(gen))


def test_followups_and_tumour_board(gen: Generator, onc: Generator) -> None:
    n = len(new_studies(gen))
    rate = len(events(gen, "followup")) / n
    # follow-ups past the horizon are dropped, so the observed rate is a bit under the parameter
    assert 0.5 * gen.p.followup_rate <= rate <= gen.p.followup_rate * 1.1
    board = events(onc, "board")
    assert board, "the oncology preset has tumour boards"
    for e in board:
        wd = (onc.start + dt.timedelta(days=int(e.t // DAY))).weekday()
        assert wd == onc.p.tumour_board_weekday
    assert len(board) > len(events(gen, "board"))
    g0 = small(seed=11, followup_rate=0.0)
    assert not events(g0, "followup")


def test_long_tail(gen: Generator) -> None:
    tail = events(gen, "longtail")
    n_primary = len(events(gen, "primary"))
    expected = gen.p.longtail_share * n_primary
    assert abs(len(tail) - expected) <= 4 * np.sqrt(expected) + 2
    assert all(gen.studies[e.study].day < 0 for e in tail), "the long tail reads old studies"
    assert not events(small(seed=11, longtail_share=0.0), "longtail")


def test_presets_differ() -> None:
    g, o = preset("general"), preset("oncology")
    assert o.returning_share > g.returning_share and o.modality_mix["PT"] > g.modality_mix["PT"]
    with pytest.raises(ValueError):
        preset("nope")
    assert dataclasses.replace(g, seed=2).seed == 2


def test_priors_opened_are_the_most_recent_relevant(onc: Generator) -> None:
    """The viewer opens the newest same-modality priors first (a hanging protocol), not random ones."""
    primary = {e.study: e.t for e in events(onc, "primary")}
    checked = 0
    for e in events(onc, "prior"):
        prior = onc.studies[e.study]
        new = next(s for s, t in primary.items() if onc.studies[s].patient == prior.patient and 0 < t - e.t < 60)
        st = onc.studies[new]
        same = [onc.studies[i] for i in onc.history[st.patient]
                if onc.studies[i].modality == st.modality and onc.studies[i].acquired_at < st.acquired_at]
        if prior.modality == st.modality:
            newer_unread = [s for s in same if (s.day, s.acquired_at) > (prior.day, prior.acquired_at)]
            # at most the priors opened before this one (same read) are newer than it
            assert len(newer_unread) <= 2
            checked += 1
    assert checked > 50


def test_study_shapes_follow_their_parameters(gen: Generator) -> None:
    """Per modality: series within the range, median images per series and median file size as set."""
    for m, shape in SHAPES.items():
        studies = [s for s in gen.studies if s.modality == m]
        if len(studies) < 30:
            continue
        per_series = np.concatenate([np.diff(s.series_starts) for s in studies])
        sizes = np.concatenate([s.sizes for s in studies])
        if shape.images_median >= 5:     # below that, rounding to whole images dominates the median
            assert abs(np.median(per_series) / shape.images_median - 1) < 0.2, m
        assert abs(np.median(sizes) / (shape.image_mb * 1e6) - 1) < 0.15, m
        n_series = np.array([s.n_series for s in studies])
        assert abs(n_series.mean() - sum(shape.series) / 2) < 4 * n_series.std() / np.sqrt(len(studies)) + 0.05, m


def test_read_delay_follows_the_department(gen: Generator) -> None:
    """A slower department's studies are read later; ED is read around the clock, others in working hours."""
    slow = dict(gen.p.departments)
    slow["ED"] = dataclasses.replace(slow["ED"], read_median_h=6.0)
    g2 = small(seed=11, departments=slow)

    def ed_delays(g: Generator) -> np.ndarray:
        acquired = {s.idx: s.acquired_at for s in new_studies(g)}
        return np.array([e.t - acquired[e.study] for e in events(g, "primary")
                         if g.studies[e.study].department == "ED"]) / 3600

    fast, late = ed_delays(gen), ed_delays(g2)
    assert np.median(late) > 4 * np.median(fast)
    p = gen.p
    for e in events(gen, "primary"):
        if gen.studies[e.study].department != "ED":
            hour = (e.t % DAY) / 3600
            weekday = (gen.start + dt.timedelta(days=int(e.t // DAY))).weekday()
            assert weekday < 5 and p.work_start_h <= hour < p.work_end_h + 0.1


def test_archive_listing_is_a_sorted_pacs_tree() -> None:
    rows = list(archive_listing(WorkloadParams(seed=3), 100_000))
    paths = [p for p, _, _ in rows]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert 80_000 < len(rows) < 120_000
    modalities = {p.split("/")[0] for p in paths}
    assert modalities <= set(SHAPES) and len(modalities) >= 5
    first = paths[0].split("/")
    assert len(first) == 5 and dt.date.fromisoformat(first[1]) < dt.date(2026, 1, 5) and first[4].endswith(".dcm")
    assert all(size >= 1024 for _, size, _ in rows)


def share_of_reads(g: Generator, kind: str) -> float:
    reads = [e for e in g.events if e.op == "R"]
    return sum(e.kind == kind for e in reads) / max(len(reads), 1)


def test_families_differ_in_structure() -> None:
    """The three other families: few priors and many follow-ups; boards that recur and PET-CT pairs;
    a fat long tail of teaching cases read again and again."""
    out = small("outpatient", seed=21, days=28, monthly_tb=0.05)
    can = small("cancer", seed=22, days=28, monthly_tb=0.05)
    tea = small("teaching", seed=23, days=28, monthly_tb=0.05)
    gen = small("general", seed=24, days=28, monthly_tb=0.05)
    assert share_of_reads(out, "prior") < share_of_reads(gen, "prior") / 2
    assert share_of_reads(out, "followup") > 2 * share_of_reads(gen, "followup")
    # a cancer case comes back to the board in later weeks, with the CT of its PET-CT
    weeks: dict[int, set[int]] = {}
    for e in events(can, "board"):
        weeks.setdefault(e.study, set()).add(int(e.t // (7 * DAY)))
    assert sum(len(w) >= 2 for w in weeks.values()) > 10
    pet = [s for s in can.studies if s.modality == "PT" and s.day >= 0]
    paired = [s for s in pet if any(c.modality == "CT" and c.patient == s.patient and c.day == s.day
                                    for c in can.studies[s.idx + 1:s.idx + 2])]
    assert len(paired) >= 0.7 * len(pet) > 0
    # teaching cases: a small set of old studies read many times
    teach = [e.study for e in events(tea, "teaching")]
    assert teach and all(tea.studies[s].day < 0 for s in teach)
    assert max(np.bincount(teach)) >= 5
    assert share_of_reads(tea, "teaching") + share_of_reads(tea, "longtail") > 5 * share_of_reads(gen, "longtail")


def test_new_box_has_no_archive() -> None:
    g = small("teaching", seed=25, days=14, monthly_tb=0.05, archive=False)
    assert all(s.day >= 0 for s in g.studies)
    assert not events(g, "teaching")
    assert all(g.studies[e.study].acquired_at < e.t for e in events(g, "prior"))   # priors the box saw
    for e in events(g, "longtail"):          # the tail reaches back only to what the box has seen
        assert g.studies[e.study].acquired_at < e.t - DAY
