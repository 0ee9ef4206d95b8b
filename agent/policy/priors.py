"""Prior-study prefetch: when a new study of a patient starts arriving, fetch the priors a
radiologist will open beside it (comparison with prior imaging is standard reporting practice).

`PriorPrefetcher.candidates(new, priors)` ranks the patient's earlier studies the way a hanging
protocol does (same modality first, then the most recent) and keeps the top `k`. The heat of rank r is
learned online: the share of prefetched rank-r studies that were actually opened (Laplace-smoothed,
`feedback(rank, used)`), so the prefetcher adapts to how many priors a site's radiologists open
instead of assuming it. Candidates below `min_heat` are not fetched. The planner
(`agent.policy.prefetch.plan`) then applies the space and bandwidth budgets.

Decides only: the catalog supplies the studies (from the DICOM PatientID of the new files), the
fetcher does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyInfo:
    key: int
    modality: str | int
    acquired: float        # acquisition time (or day), any monotone unit
    missing_bytes: int     # bytes of the study not in the cache


class PriorPrefetcher:
    def __init__(self, k: int = 3, min_heat: float = 0.2) -> None:
        self.k = k
        self.min_heat = min_heat
        self.fetched = [0] * k
        self.used = [0] * k

    def heat(self, rank: int) -> float:
        return (self.used[rank] + 1) / (self.fetched[rank] + 2)

    def rank(self, new: StudyInfo, priors: list[StudyInfo]) -> list[StudyInfo]:
        older = [p for p in priors if p.key != new.key and p.acquired <= new.acquired]
        older.sort(key=lambda p: (p.modality != new.modality, -p.acquired, p.key))
        return older[: self.k]

    def candidates(self, new: StudyInfo, priors: list[StudyInfo]) -> list[tuple[int, StudyInfo, float]]:
        """(rank, study, heat) for the ranked priors worth fetching (heat >= min_heat)."""
        out = []
        for r, p in enumerate(self.rank(new, priors)):
            h = self.heat(r)
            if h >= self.min_heat:
                out.append((r, p, h))
        return out

    def feedback(self, rank: int, used: bool) -> None:
        """A prefetched study of this rank was opened (used) or evicted/expired unopened."""
        self.fetched[rank] += 1
        self.used[rank] += int(used)
