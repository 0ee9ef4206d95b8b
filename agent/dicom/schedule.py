"""The agent writes the study-index snapshot itself (agent.dicom.snapshot) every `[dicom] snapshot_interval`
seconds, so a replacement box's `index-rebuild` finds a recent one without anyone scheduling
`pacsgw index-snapshot`. In an HA pair only the active box writes it: the standby's catalog follows the
bucket and has no index rows of its own, so its snapshot would replace a full one with an empty one.
A failed run is logged and tried again at the next interval; the previous snapshot stays until a new one is
complete.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog

from agent.config import Config
from agent.dicom import snapshot
from agent.uplink.s3 import error_code

log = structlog.get_logger("pacsgw.dicom")


class SnapshotSchedule:
    def __init__(self, cfg: Config, active: Callable[[], bool]) -> None:
        self.cfg, self.active = cfg, active  # active(): False while this box is an HA standby

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.dicom.snapshot_interval)
            await self.once()

    async def once(self) -> dict[str, Any] | None:
        """Write one snapshot now (unless this box is a standby); → its manifest, None when none was written."""
        if not self.active():
            log.info("index_snapshot_skipped", reason="HA standby: the active box writes the snapshot")
            return None
        t0 = time.monotonic()
        try:
            manifest = await snapshot.write(self.cfg, snapshot.catalog_rows(self.cfg.catalog_path))
        except Exception as e:  # the line may be down: the next interval tries again
            log.error("index_snapshot_failed", error=error_code(e), detail=str(e)[:300],
                      retry_in=self.cfg.dicom.snapshot_interval)
            return None
        log.info("index_snapshot_written", snapshot=manifest["snapshot"], rows=manifest["rows"],
                 segments=len(manifest["segments"]), seconds=round(time.monotonic() - t0, 2))
        return manifest
