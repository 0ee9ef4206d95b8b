"""Two boxes, one address: this box's role in an active/standby pair behind a keepalived (VRRP) address
(docs/ha.md). keepalived decides who holds it (agent/hahook.py); a standby refuses writes, follows the bucket into
its catalog (a take-over serves every object at once) and uploads its queue before it may hold the address.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import structlog
from prometheus_client import Counter, Gauge

from agent.audit import AuditLog, Who
from agent.config import Config
from agent.hahook import STATES
from agent.metrics import Metrics
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog
from agent.store.gateway import Gateway, Refusals
from agent.supervise import Loops
from agent.uplink.s3 import S3Uplink, error_code
from agent.uplink.uploader import HA_DIR, PARKED, Uploader

log = structlog.get_logger("pacsgw.ha")

ROLE_POLL = 0.2  # seconds: part of the fail-over time
PEER_POLL = 2.0
PEER_MAX_BYTES = 64 * 1024  # a /healthz answer is about 2 KiB
LINE_POLL = 2.0
HOT_PATH = f"{HA_DIR}/hot.json"  # the active box's hot set, published every follow_seconds
HOT_FILES = 2000
HOT_MAX_BYTES = 4 * 1024 * 1024
STANDBY_REFUSAL = "this is the standby box of an HA pair: store to the pair's floating address"
SYSTEM = Who(user="keepalived", protocol="ha")


def read_role_file(path: Path, boot_time: float) -> str | None:
    """keepalived's last state for this box; UNKNOWN without a role file of this boot: a stale MASTER is none. None
    when the file cannot be read now (out of descriptors: taken for none, the active box turned standby, attack48)."""
    try:
        st = path.stat()
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return "UNKNOWN"
    except OSError:
        return None
    if st.st_mtime < boot_time or not isinstance(data, dict) or data.get("state") not in STATES:
        return "UNKNOWN"
    return str(data["state"])


def peer_view(body: bytes) -> dict[str, Any]:
    """The peer's /healthz answer (plain HTTP) cut to a few known values before a page, terminal or log."""
    if len(body) > PEER_MAX_BYTES:
        raise ValueError(f"answer longer than {PEER_MAX_BYTES} bytes")
    if not isinstance(h := json.loads(body), dict):
        raise ValueError("answer is not a JSON object")
    ha = h.get("ha") if isinstance(h.get("ha"), dict) else {}
    status, role, eligible = h.get("status"), ha.get("role"), ha.get("eligible")
    return {"status": status if status in ("ok", "degraded", "failing") else "unknown",
            "role": role if role in ("active", "standby") else "unknown",
            "eligible": eligible if isinstance(eligible, bool) else None}


def ineligible(role: str, queue_files: int, draining: bool) -> str:
    """Why this box may not hold the floating address now ('' if it may): no box with a queue takes over."""
    if draining:
        return "draining for shutdown"
    if role == "standby" and queue_files:
        return (f"{queue_files} files of this box not yet in object storage: uploading them before competing "
                "for the address")
    return ""


@dataclass
class HaState:
    role: str = "standby"
    keepalived: str = "UNKNOWN"
    since: float = field(default_factory=time.time)
    last_takeover: float | None = None
    takeovers: int = 0
    followed: dict[str, Any] = field(default_factory=dict)
    peer: dict[str, Any] = field(default_factory=dict)


class HaMonitor:
    def __init__(self, cfg: Config, gateway: Gateway, db: AsyncCatalog, refusals: Refusals, uploader: Uploader,
                 s3: S3Uplink, cache: Cache, audit: AuditLog, metrics: Metrics, loops: Loops) -> None:
        self.cfg, self.gateway, self.db, self.refusals, self.uploader, self.s3, self.cache, self.audit = (
            cfg.ha, gateway, db, refusals, uploader, s3, cache, audit)  # refusals.write is set here
        self.state = HaState()
        self._boot = psutil.boot_time()
        self._follow_lock = asyncio.Lock()
        self.loops = loops  # the agent's, restarted after a crash: a dead watcher left the box in its role for ever
        r = metrics.registry
        gauge = functools.partial(Gauge, registry=r)
        # the gauges read the state at each scrape: they and /healthz cannot disagree
        gauge("pacsgw_ha_active", "1 when this box is the active box of its HA pair").set_function(
            lambda: self.state.role == "active")
        gauge("pacsgw_ha_peer_up", "1 when the HA peer's /healthz answered").set_function(
            lambda: bool(self.state.peer.get("reachable")))
        self.m_takeovers = Counter("pacsgw_ha_takeovers", "Times this box became the active box", registry=r)
        gauge("pacsgw_ha_last_takeover_timestamp_seconds", "When this box last became the active box (0: never)"
              ).set_function(lambda: self.state.last_takeover or 0)
        gauge("pacsgw_ha_followed_timestamp_seconds", "When the standby last followed the bucket into its catalog"
              ).set_function(lambda: self.state.followed.get("at", 0))

    async def start(self) -> None:
        self.refusals.write = STANDBY_REFUSAL
        await self._read_role()
        self.loops.every("ha-role", ROLE_POLL, self._read_role)
        self.loops.start("ha-follow", self._follow_loop)
        # a dead line must show on /healthz (and so move the address) even when nothing is uploading
        self.loops.every("ha-line", LINE_POLL, self.uploader.line.check)
        if self.cfg.peer:
            self.loops.start("ha-peer", self._watch_peer)

    async def _read_role(self) -> None:
        if (state := await asyncio.to_thread(read_role_file, Path(self.cfg.role_file), self._boot)) is not None:
            self._apply(state)

    def _apply(self, keepalived_state: str) -> None:
        role = "active" if keepalived_state == "MASTER" else "standby"
        changed_state = keepalived_state != self.state.keepalived
        self.state.keepalived = keepalived_state
        if role == self.state.role:
            if changed_state:
                log.info("ha_state", role=role, keepalived=keepalived_state)
            return
        previous, now = self.state.role, time.time()
        self.state.role, self.state.since = role, now
        self.refusals.write = "" if role == "active" else STANDBY_REFUSAL
        if role == "active":
            self.state.takeovers += 1
            self.state.last_takeover = now
            self.m_takeovers.inc()
            # files the old active box stored after the last follow: every directory is listed again on its next use
            self.loops.start("ha-unlist", self.db.unlist_all)
        log.warning("ha_takeover" if role == "active" else "ha_standby", role=role, previous=previous,
                    keepalived=keepalived_state)
        self.audit.record(SYSTEM, "ha_role", "/", role=role, previous=previous, keepalived=keepalived_state)

    def health(self, queue_files: int, draining: bool) -> dict[str, Any]:
        """/healthz's `ha`: the role, and whether this box may hold the address (agent/hahook.py)."""
        reason = ineligible(self.state.role, queue_files, draining)
        return asdict(self.state) | {"eligible": not reason, "reason": reason}

    async def _follow_loop(self) -> None:
        """Standby: follow the bucket, then prefetch the active box's hot set. Active: publish the hot set."""
        while True:
            if self.uploader.line.reachable:
                try:
                    if self.state.role == "standby":
                        await self.follow()
                        await self.prefetch_hot()
                    else:
                        await self.publish_hot()
                except Exception as e:  # the next pass tries again
                    log.warning("ha_follow_failed", role=self.state.role, error=error_code(e), detail=str(e)[:200])
            await asyncio.sleep(self.cfg.follow_seconds)

    async def publish_hot(self) -> None:
        body = json.dumps({"paths": await self.db.hot_paths(HOT_FILES), "time": time.time()}).encode()
        await self.s3.put_raw(self.s3.key(HOT_PATH), body)

    async def prefetch_hot(self) -> None:
        """Bring the active box's hot set into this box's cache, hottest first, up to prefetch_bytes (cached or not)."""
        if not self.cfg.prefetch_bytes:
            return
        body = await self.s3.get_raw(self.s3.key(HOT_PATH), HOT_MAX_BYTES)  # larger: not the active box's (ValueError)
        if body is None:
            return
        try:
            paths = json.loads(body)["paths"]
        except (ValueError, KeyError, TypeError):
            log.warning("ha_hot_set_unreadable", key=HOT_PATH)
            return
        held = fetched = files = 0
        deadline = time.monotonic() + self.cfg.follow_seconds  # the next follow must not wait for a long prefetch
        for path in paths[:HOT_FILES] if isinstance(paths, list) else []:
            if self.state.role != "standby" or not isinstance(path, str) or time.monotonic() > deadline:
                break
            e = await self.db.get(path)  # only files the catalog knows: the list names nothing new
            if e is None or e.is_dir or e.state != "clean" or held + e.size > self.cfg.prefetch_bytes:
                continue
            if e.blob is None:
                if not await self.gateway.prefetch(e):
                    continue
                fetched, files = fetched + e.size, files + 1
            held += e.size
        if files:
            log.info("ha_prefetched", files=files, bytes=fetched, hot_set_bytes=held)

    async def follow(self) -> None:
        """One pass over the whole namespace in the bucket into the catalog (new, changed and gone objects)."""
        async with self._follow_lock:
            t0, added, changed, objects = time.monotonic(), 0, 0, 0
            await self.db.follow_begin()
            async for page in self.s3.walk():
                page = [o for o in page if not o[0].startswith((HA_DIR + "/", PARKED + "/"))]
                a, c, stale = await self.db.follow_batch(page)
                added, changed, objects = added + a, changed + c, objects + len(page)
                for blob in stale:
                    self.cache.remove(blob)
            gone, now = await self.db.follow_end(), time.time()
            self.state.followed = {"at": now, "objects": objects, "added": added, "changed": changed, "gone": gone,
                                   "seconds": round(time.monotonic() - t0, 3)}
            if added or changed or gone:
                log.info("ha_followed", **self.state.followed)

    async def _watch_peer(self) -> None:
        """The peer's view for /status, /healthz, the log and pacsgw_ha_peer_up: informational only (docs/ha.md)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_POLL)) as session:
            while True:
                peer: dict[str, Any] = {"url": self.cfg.peer, "checked": time.time()}
                try:
                    async with session.get(self.cfg.peer.rstrip("/") + "/healthz") as r:
                        peer |= {"reachable": True, **peer_view(await r.content.read(PEER_MAX_BYTES + 1))}
                except Exception as e:  # a dead peer is what this watches for
                    peer |= {"reachable": False, "error": error_code(e)}
                if any(peer.get(k) != self.state.peer.get(k) for k in ("reachable", "role")):
                    log.warning("ha_peer", **{k: v for k, v in peer.items() if k != "checked"})
                self.state.peer = peer
                await asyncio.sleep(PEER_POLL)
