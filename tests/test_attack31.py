"""attack31: hostile input against this session's study keys (catalog OF_STUDY, the prior planner's header queue)."""

from __future__ import annotations

from test_catalog import cat, write  # noqa: F401  (cat: the fixture)

from agent.store.catalog import Catalog


def _indexed(cat: Catalog, path: str, uid: str) -> None:  # noqa: F811
    gen = write(cat, path)
    cat.claim(path, gen)
    cat.mark_clean(path, gen, None, None, "00", (path, 10, uid, "1.3", "1.4.9", "CT", "2025", None))
    assert cat.uncache(path, gen)


def test_a_study_in_a_directory_named_by_its_uid_is_paged_once(cat):  # noqa: F811
    """The usual layout <StudyInstanceUID>/<file> (study_depth 1, `[dicom] metadata`): the key is the UID and the
    directory both; each file is in both halves of missing_page. Twice paged, the prior fetch downloaded it twice."""
    for i in range(3):
        _indexed(cat, f"1.2.3/f{i}.dcm", "1.2.3")
    assert cat.missing_under("1.2.3") == (3, 30)
    assert [e.path for e in cat.missing_page("1.2.3", "", 16)] == ["1.2.3/f0.dcm", "1.2.3/f1.dcm", "1.2.3/f2.dcm"]
    assert [e.path for e in cat.missing_page("1.2.3", "", 2)] == ["1.2.3/f0.dcm", "1.2.3/f1.dcm"]
