"""attack31: hostile input against this session's study keys (catalog OF_STUDY, the prior planner's header queue)."""

from __future__ import annotations

import io
import time

from aiohttp import web
from test_attack30 import _Portal
from test_catalog import cat, write  # noqa: F401  (cat: the fixture)
from test_ftp import ftp

from agent.store.catalog import Catalog
from faultkit import wait_for


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


def test_a_study_uid_naming_a_directory_does_not_take_in_its_files(cat):  # noqa: F811
    """A writer's header may give any StudyInstanceUID the VR allows: "2025" is one. Keyed by it, its study was also
    every file below directory 2025/ (the year of a YYYY/MM/DD layout, or a patient's tree named by a numeric ID):
    a prior plan counted them, fetched them into the cache, and a read of any of them settled the prior as opened."""
    for day in ("01/10", "02/11"):
        gen = write(cat, f"2025/{day}/x.dcm", size=1000)
        cat.claim(f"2025/{day}/x.dcm", gen)
        cat.mark_clean(f"2025/{day}/x.dcm", gen, None, None, "00")
        assert cat.uncache(f"2025/{day}/x.dcm", gen)
    _indexed(cat, "upload/evil.dcm", "2025")
    assert cat.missing_under("2025") == (1, 10)
    assert [e.path for e in cat.missing_page("2025", "", 16)] == ["upload/evil.dcm"]
    cat.record_prior_fetch("2025", 0)
    cat.record_access([("2025/01/10/x.dcm", time.time() + 1, 1)])
    assert cat.settle_prior_fetches() == [(0, False)]     # nothing of it cached, none of it read
    assert cat.missing_under("2025/01") == (1, 1000)      # a directory with no study of its name: its subtree


class _ExpressPortal(_Portal):
    """A portal or web app in the store's place that tags every page with a weak ETag (Express's default)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and self.page:
            return web.Response(status=200, text="<html><body>Request blocked by policy</body></html>",
                                content_type="text/html", headers={"ETag": 'W/"33-Qm9ndXMgcGFnZQ"'})
        return await super()._handle(request)


def test_an_upload_answered_by_a_web_page_with_a_weak_etag_is_not_taken_for_stored(agent_factory, seaweed):
    """attack30 refused a PUT's 200 without an ETag; a web page may carry one, weak (W/, a page's version: no S3 store
    tags an object so). It was taken for stored: the file marked clean, its only copy evictable."""
    proxy = _ExpressPortal(seaweed.endpoint_url).start()
    try:
        agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url}).start()
        f = ftp(agent)
        f.storbinary("STOR portal.dcm", io.BytesIO(b"patient image " * 1000))
        time.sleep(2)
        assert not [e for e in agent.events("uploaded") if e.get("path") == "portal.dcm"]
        assert agent.health()["queue_depth"] == 1
        proxy.page = False
        wait_for(lambda: agent.health()["queue_depth"] == 0, 60, what="the queued upload")
        f.quit()
    finally:
        proxy.stop()
