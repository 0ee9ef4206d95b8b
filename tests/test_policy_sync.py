"""The live way in (`PolicyStack.sync`, the catalog's rows each pass) tells the policy what the simulator's way in
(`inserted` / `accessed`, event by event) tells it, so both evict the same files: a written file read before the
pass that first sees it, and a prior prefetched minutes after it was read and evicted, were told wrongly."""

from __future__ import annotations

from dataclasses import dataclass

from agent.policy.stack import CatalogRow, PolicyStack, StackSpec

T = 1_000_000.0


@dataclass
class Copy:
    """A cached file as the catalog has it (agent/store/catalog: entries' cache and read columns)."""

    size: int
    study: str
    last_access: float
    count: int
    created: float
    cached_at: float
    cached_by: str


class Both:
    """One stack fed event by event (the simulator), one through a catalog's rows at each pass (the live agent)."""

    def __init__(self) -> None:
        self.sim, self.live = PolicyStack(StackSpec("adaptive")), PolicyStack(StackSpec("adaptive"))
        self.catalog: dict[str, Copy] = {}
        self.evicted: dict[str, Copy] = {}      # an evicted file's row keeps its reads and mtime

    def write(self, key: str, study: str, t: float) -> None:
        self.sim.inserted(key, 100, t, t, study, written=True)
        self.catalog[key] = Copy(100, study, t, 0, t, t, "write")

    def read(self, key: str, study: str, t: float) -> None:
        if key in self.catalog:
            self.sim.accessed(key, t)
            c = self.catalog[key]
            c.last_access, c.count = t, c.count + 1
            return
        old = self.evicted.pop(key, Copy(100, study, t, 0, 0.0, t, "read"))     # not seen before: the archive's
        self.sim.inserted(key, 100, t, old.created, study)
        self.catalog[key] = Copy(100, study, t, old.count + 1, old.created, t, "read")  # the fetch begins now

    def prefetch(self, key: str, t: float) -> None:
        old = self.evicted.pop(key)
        self.sim.inserted(key, 100, t, old.created, old.study, prefetch=True)
        self.catalog[key] = Copy(100, old.study, old.last_access, old.count, old.created, t, "prefetch")

    def link(self, prior: str, new: str) -> None:
        for s in (self.sim, self.live):
            s.prior_fetched(prior, new, 0.5, 0, 0.0)

    def learn(self, t: float) -> None:
        """The live agent's look at the catalog between passes (agent/store/evictor.py `learn`, every minute)."""
        self.live.sync([CatalogRow(k, c.size, c.last_access, c.count, c.created, c.study, c.cached_at, c.cached_by)
                        for k, c in self.catalog.items()], t)

    def evict(self, bytes_to_free: int, t: float) -> tuple[list[str], list[str]]:
        """A pass on both → (the simulator's victims, the live agent's); the live agent's leave the catalog."""
        self.learn(t)
        out = [list(s.victims(bytes_to_free, t, no_table)) for s in (self.sim, self.live)]
        for key in out[1]:
            self.evicted[key] = self.catalog.pop(key)
        return out[0], out[1]


def no_table() -> tuple:
    raise AssertionError("an online policy answers from its index")


def test_a_written_study_read_before_the_pass_is_told_written_then_read() -> None:
    """Study B is written and read before the evictor's pass sees it: told read on a miss, it was never written here
    for the policy, so the second door (a written study after its first session goes first while the cache turns
    over sooner than studies come back) did not put it first."""
    b = Both()
    for i in range(3):
        b.write(f"X{i}", "X", T)
    assert b.evict(100, T + 1) == (["X2"], ["X2"])      # the capacity: 200 bytes, turned over in seconds
    b.write("A0", "A", T + 60)
    for t in (T + 660, T + 4260):
        b.read("A0", "A", t)
        b.learn(t + 60)
    b.write("B0", "B", T + 4300)
    b.read("B0", "B", T + 7200)
    sim, live = b.evict(100, T + 7300)
    assert sim == ["B0"] and live == sim


def test_a_prior_prefetched_minutes_after_it_was_read_is_told_prefetched_when_fetched() -> None:
    """Prior P, written here, was read, evicted and fetched again for its patient's new study N, all within the
    10 minutes of slack the origin was inferred with: it was told read on a miss at its old read, not a prefetch
    linked to N now (which the fresh segment holds until N's session)."""
    b = Both()
    for i in range(3):
        b.write(f"P{i}", "P", T)
        b.write(f"Q{i}", "Q", T + 1)
    b.learn(T + 2)
    for i in range(3):
        b.read(f"P{i}", "P", T + 60)
    b.learn(T + 61)
    assert b.evict(300, T + 120) == (["P0", "P1", "P2"], ["P0", "P1", "P2"])
    for i in range(3):
        b.write(f"N{i}", "N", T + 180)
    b.link("P", "N")
    for i in range(3):
        b.prefetch(f"P{i}", T + 181)
    sim, live = b.evict(100, T + 240)
    assert "P0" not in sim and live == sim


def test_several_reads_between_two_passes_are_as_many_requests_as_in_the_simulator() -> None:
    """A file read three times between two looks at the catalog was one request to the live policy and three to the
    simulator's: the experts' shadow scores (which choose the expert that evicts) and the window they decay in count
    requests, so the live agent's choice drifted from the simulated one."""
    b = Both()
    for i in range(3):
        b.write(f"X{i}", "X", T)
    b.learn(T + 1)
    for t in (T + 10, T + 20, T + 30):
        b.read("X0", "X", t)
    b.read("X1", "X", T + 40)
    b.learn(T + 60)
    scores = [[s.score for s in stack.policy.shadows] for stack in (b.sim, b.live)]
    assert scores[0] == [4.0, 4.0] and scores[1] == scores[0]
    assert b.live.policy.requests == b.sim.policy.requests
