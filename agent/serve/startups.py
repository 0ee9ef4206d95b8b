"""The box-wide cap on connections that have not logged in yet: [ftp] and [sftp] max_unauthenticated (OpenSSH's
MaxStartups). max_sessions_per_address bounds one address only: a client with many (127.0.0.0/8 on the box, an
IPv6 /64) opened 64 connections from each and held them without a password until login_timeout, each a
descriptor, a task and buffers, and the PACS's own connections then found none left.

Each connection holds a LoginGuard slot (counted over every serving process of the box, apart per protocol) from
its accept until it logs in or ends; one over the cap is refused (FTP: 421, SSH: closed) and reported as every
session cap's refusals are (contract.refuse_session). A full cap is a lever against the PACS too (256 connections
held from a few addresses kept every new one out), so an address some user has logged in from before (LoginGuard's
trusted addresses, since boot) is let in uncounted even then: only max_sessions_per_address bounds it.
"""

from __future__ import annotations

import asyncio

from agent.audit import Who
from agent.auth import LoginGuard
from agent.serve.contract import refuse_session
from agent.store.gateway import Gateway


class Startup:
    """One connection's slot, from its accept until it logs in or ends: taking it starts at once."""

    def __init__(self, protocol: str, cap: int, guard: LoginGuard, gateway: Gateway, address: str, peer: str) -> None:
        self.guard = guard
        self.task = asyncio.ensure_future(self._take(protocol, cap, gateway, address, peer))  # peer: 'address:port'
        self._ended = False

    async def _take(self, protocol: str, cap: int, gateway: Gateway, address: str, peer: str) -> int | None:
        slot = await self.guard.take_session(f"{protocol} unauthenticated", "*", cap)
        if slot is None and await self.guard.known(address):
            return 0  # let in uncounted: see the module's doc
        if slot is None:
            refuse_session(gateway, protocol, Who("-", protocol, peer),
                           f"too many connections not logged in (limit {cap})", kind="UnauthenticatedLimit")
        return slot

    async def admitted(self) -> bool:
        """Whether the connection got its slot (False: refused; the caller turns it away)."""
        return await asyncio.shield(self.task) is not None  # a cancelled caller leaves the slot to end()

    def end(self) -> None:
        """Logged in, or gone: the slot goes back (once taken, if the guard is still at it). Idempotent."""
        if not self._ended:
            self._ended = True
            self.task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[int | None]) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            self.guard.release_session(task.result() or 0)
