"""settle35: a prior fetch settles as evicted unread only once its fetch is over (a running one has none of its files
cached until the first lands)."""

from __future__ import annotations

import time

from test_catalog import cat, write  # noqa: F401  (cat: the fixture)


def test_a_prior_whose_fetch_runs_is_not_settled_unread_until_the_fetch_is_over(cat):  # noqa: F811
    """Recorded, none of its files landed yet: open while this process fetches it; over (or cut by a restart: a new
    process fetches nothing), settled unused. A read while it runs counts as opened."""
    for study in ("1.2.1", "1.2.2"):
        gen = write(cat, f"{study}/f.dcm")
        cat.claim(f"{study}/f.dcm", gen)
        cat.mark_clean(f"{study}/f.dcm", gen, None, None, "00")
        assert cat.uncache(f"{study}/f.dcm", gen)
        cat.record_prior_fetch(study, int(study[-1]))
    cat.record_access([("1.2.2/f.dcm", time.time() + 1, 1)])
    assert cat.settle_prior_fetches({"1.2.1", "1.2.2"}) == [(2, True)]
    assert cat.settle_prior_fetches({"1.2.1"}) == []
    assert cat.settle_prior_fetches() == [(1, False)]
