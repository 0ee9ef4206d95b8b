"""Prior-study prefetch: when a new study of a patient starts arriving, fetch the priors a radiologist will open beside
it (comparison with prior imaging is standard reporting practice).

`PriorPrefetcher.candidates(new, priors)` ranks the patient's earlier studies the way a hanging protocol does (same
modality first, then the most recent) and keeps the top `k`. Its heat is learned online per *cell*: the rank × whether
the prior is of the new study's modality × whether it is older than `recent_days` (a prior of another modality, or
years old, is opened less often at the same rank: docs/replay.md, "Which priors are opened"). A cell's heat is the
share of its prefetched studies that were opened, shrunk towards its rank's share (`shrink` pseudo-counts) so a thin
cell borrows from its rank (`feedback(cell, used)`): it learns which priors a site's radiologists open. Candidates
below `min_heat` are not fetched, except once in `EXPLORE` chances of their cell (a shut cell never fetched gets no
outcomes, and its heat would stay below the floor for good). A plan's space budget shrinks with the share of the
planner's fetches that were opened (`space_share`: a small cache evicts priors before their session, and fewer bytes
per plan are more often still there then; docs/replay.md, round 18). A cell is an int (rank + k × kind), which the
live agent keeps as the fetch's rank in the catalog, so what was learnt survives restarts. The planner
(`agent.policy.prefetch.plan`) then applies the space and bandwidth budgets.

Cold start (a new box, a kind of prior not fetched yet): a cell with fewer than `COLD_OUTCOMES` outcomes of its own
cannot be judged (its heat is its rank's), so it has at most one fetch unsettled at a time (`waiting`). An outcome
comes back only when the prior is opened or evicted, hours after its fetch; fetching at every new study meanwhile spent
cancer 3 %'s cold start on 18 priors (2x the cache), 1 opened (docs/replay.md, rounds 29 and 31).

Decides only: the catalog supplies the studies (from the DICOM PatientID of the new files), the fetcher does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyInfo:
    key: int
    modality: str | int
    acquired: float        # acquisition day (a day number: `recent_days` is in days)
    missing_bytes: int     # bytes of the study not in the cache


MIN_HEAT = 0.2  # chosen on the tuning families (docs/replay.md); bench/gap_share.py --min-heat overrides
EXPLORE = 16    # a cell below the floor is fetched once in this many chances (docs/replay.md, round 14)
KINDS = 4       # (same modality, recent), (other, recent), (same, old), (other, old)
# a plan's space budget scales with the share of past prefetches opened: min(1, opened / OPEN_TARGET) of it, after
# `OPEN_WARM` outcomes (0: off); bench/gap_share.py --open-target overrides
OPEN_TARGET = 0.6
OPEN_WARM = 20
OPEN_FLOOR = 0.1    # the least share of the budget a plan keeps
# The newest studies of a patient a plan weighs (by study date): a writer inventing 10 000 studies for one patient
# made each new study's plan stall the agent's event loop 0.5 s; a prior behind 256 newer ones is never ranked.
PATIENT_STUDIES = 256
# cold start: a cell with fewer outcomes than this has one fetch unsettled at a time (0: off); one older than COLD_TTL_S
# no longer counts (a prior cached unread for days, or one whose outcome a restart lost). bench/gap_share.py --cold
COLD_OUTCOMES = 2
COLD_TTL_S = 86400.0


class PriorPrefetcher:
    def __init__(self, k: int = 3, min_heat: float | None = None, recent_days: float = 180.0,
                 shrink: float = 2.0) -> None:
        self.k = k
        self.min_heat = MIN_HEAT if min_heat is None else min_heat
        self.recent_days, self.shrink = recent_days, shrink
        self.fetched = [0] * (k * KINDS)
        self.used = [0] * (k * KINDS)
        self.shut = [0] * (k * KINDS)       # chances a cell below the floor was passed over since its last fetch
        self.unsettled: dict[int, float] = {}     # cold cell → when its fetch whose outcome is not in yet began

    def heat(self, rank: int) -> float:
        """The share of prefetched priors of this rank (any cell) that were opened, Laplace-smoothed."""
        cells = range(rank, self.k * KINDS, self.k)
        return (sum(self.used[c] for c in cells) + 1) / (sum(self.fetched[c] for c in cells) + 2)

    def cell_heat(self, cell: int) -> float:
        return (self.used[cell] + self.shrink * self.heat(cell % self.k)) / (self.fetched[cell] + self.shrink)

    def cell(self, rank: int, new: StudyInfo, prior: StudyInfo) -> int:
        kind = int(prior.modality != new.modality) + 2 * int(new.acquired - prior.acquired > self.recent_days)
        return rank + self.k * kind

    def rank(self, new: StudyInfo, priors: list[StudyInfo]) -> list[StudyInfo]:
        older = [p for p in priors if p.key != new.key and p.acquired <= new.acquired]
        older.sort(key=lambda p: (p.modality != new.modality, -p.acquired, p.key))
        return older[: self.k]

    def candidates(self, new: StudyInfo, priors: list[StudyInfo]) -> list[tuple[int, StudyInfo, float]]:
        """(cell, study, heat) for the ranked priors worth fetching (heat >= min_heat, or a shut cell's exploratory
        chance), in rank order."""
        out = []
        for r, p in enumerate(self.rank(new, priors)):
            c = self.cell(r, new, p)
            h = self.cell_heat(c)
            if h < self.min_heat:
                self.shut[c] += 1
                if self.shut[c] < EXPLORE:
                    continue
                self.shut[c] = 0
            out.append((c, p, h))
        return out

    def space_share(self) -> float:
        """The share of a plan's space budget to use: the planner spends where what it fetched was opened."""
        fetched = sum(self.fetched)
        if not OPEN_TARGET or fetched < OPEN_WARM:
            return 1.0
        return max(OPEN_FLOOR, min(1.0, sum(self.used) / fetched / OPEN_TARGET))

    def cold(self, cell: int) -> bool:
        return self.fetched[cell] < COLD_OUTCOMES

    def waiting(self, cell: int, now: float) -> bool:
        """Whether a cold cell's fetch is out: its next one waits for the outcome."""
        return self.cold(cell) and cell in self.unsettled and now - self.unsettled[cell] <= COLD_TTL_S

    def fetching(self, cell: int, now: float) -> None:
        """A planned prior of this cell is being fetched; its outcome is not in yet."""
        if 0 <= cell < len(self.fetched) and self.cold(cell):
            self.unsettled[cell] = now

    def mode(self) -> str:
        judged = sum(not self.cold(c) for c in range(len(self.fetched)))
        cells = f"{judged} of {len(self.fetched)} kinds of prior judged"
        if sum(self.fetched) >= OPEN_WARM:
            return f"learned: {cells}"
        return f"cold start: {sum(self.fetched)} outcomes, {cells}, {len(self.unsettled)} of their fetches unsettled"

    def feedback(self, cell: int, used: bool) -> None:
        """A prefetched study of this cell was opened (used) or evicted/expired unopened."""
        if 0 <= cell < len(self.fetched):
            self.fetched[cell] += 1
            self.used[cell] += int(used)
            self.unsettled.pop(cell, None)
