"""Studies: the studies seen being written, by their key (what prior-study prefetch finds a patient's earlier
studies by), the prior studies it fetched and whether they were opened, and the study index of DICOM objects
(`pacsgw find`; rebuildable from the bucket alone)."""

from __future__ import annotations

import time
from typing import Collection, Sequence

from agent.store.catalog.base import COPY_INDEX_ROW, OF_STUDY, CatalogBase, of_study

# (path, size, study_uid, series_uid, modality, study_date, cached)
Found = tuple[str, int, str | None, str | None, str | None, str | None, int]


class Studies(CatalogBase):
    def study_known(self, key: str, patient: str | None = None) -> bool:
        """Whether the study is recorded: for this patient, if both its row and `patient` name one."""
        return self._exists("SELECT 1 FROM studies WHERE dir = ? AND (patient IS NULL OR ? IS NULL OR patient = ?)",
                            (key, patient, patient))

    def record_study(self, key: str, patient: str | None, study_uid: str | None, study_date: str | None,
                     modality: str | None) -> bool:
        """Remember a study by its key (OF_STUDY; first writer wins). → False if it was already known."""
        return self._write("INSERT OR IGNORE INTO studies (dir, patient, study_uid, study_date, modality, recorded) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (key, patient, study_uid, study_date, modality, time.time()),
                           durable=False) == 1

    def patient_studies(self, patient: str, newest: int) -> list[tuple[str, str | None, str | None, str | None]]:
        """(key, study_uid, study_date, modality) of a patient's `newest` studies (by date), oldest first."""
        return self.db.execute("SELECT * FROM (SELECT dir, study_uid, study_date, modality FROM studies WHERE patient "
                               "= ? ORDER BY study_date DESC, dir DESC LIMIT ?) ORDER BY study_date, dir",
                               (patient, newest)).fetchall()

    def queue_worker_study(self, path: str, study_uid: str | None, study_date: str | None, modality: str | None,
                           patient: str | None, user: str) -> None:
        """A serving worker stored the first file of a study: for the owner to plan its priors (worker_studies)."""
        self._write("INSERT INTO worker_studies (path, study_uid, study_date, modality, patient, user) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (path, study_uid, study_date, modality, patient, user), durable=False)

    def worker_studies(self, limit: int) -> list[tuple[int, str, str | None, str | None, str | None, str | None, str]]:
        """The oldest `limit` queued (id, path, study_uid, study_date, modality, patient, user)."""
        return self.db.execute("SELECT id, path, study_uid, study_date, modality, patient, user FROM worker_studies "
                               "ORDER BY id LIMIT ?", (limit,)).fetchall()

    def worker_studies_taken(self, last: int) -> None:
        """The owner took the queued studies up to id `last` in."""
        self._write("DELETE FROM worker_studies WHERE id <= ?", (last,), durable=False)

    def record_prior_fetch(self, key: str, rank: int) -> None:
        self._write("INSERT OR REPLACE INTO prior_fetches (dir, rank, fetched, used) VALUES (?, ?, ?, NULL)",
                    (key, rank, time.time()), durable=False)

    def settle_prior_fetches(self, fetching: Collection[str] = ()) -> list[tuple[int, bool]]:
        """Settle open prior fetches: used once a file was read, unused once none is cached and its fetch is over (not
        in `fetching`, the keys this process fetches now: one in flight has none cached until its first file lands; a
        fetch a restart cut is over) → (rank, used)."""
        settled = []
        with self._tx(durable=False):
            for d, rank, fetched in self.db.execute(
                    "SELECT dir, rank, fetched FROM prior_fetches WHERE used IS NULL").fetchall():
                read = self._exists(f"SELECT 1 FROM entries WHERE {OF_STUDY} AND last_access > ? LIMIT 1",
                                    (*of_study(d), fetched))
                if read or d not in fetching and not self._exists(
                        f"SELECT 1 FROM entries WHERE {OF_STUDY} AND blob IS NOT NULL LIMIT 1", of_study(d)):
                    self.db.execute("UPDATE prior_fetches SET used = ? WHERE dir = ?", (int(read), d))
                    settled.append((int(rank), read))
        return settled

    def prior_outcomes(self) -> list[tuple[int, bool]]:
        return [(r, bool(u)) for r, u in self.db.execute("SELECT rank, used FROM prior_fetches WHERE used IS NOT NULL")]

    def index_dicom(self, rows: Sequence[tuple[object, ...]]) -> None:
        """Upsert study-index rows (path, size, study_uid, series_uid, sop_uid, modality, study_date, patient)."""
        with self._tx(durable=False):
            self._index_rows(rows)

    def copy_dicom_row(self, src: str, dst: str) -> None:
        """A server-side copy (rename) of an indexed object: index the copy too."""
        self._write(COPY_INDEX_ROW, (dst, src), durable=False)

    def unshipped_index_rows(self, limit: int) -> list[tuple[object, ...]]:
        """Up to limit snapshot rows for the next index delta: objects confirmed under their queued ETag."""
        with self._tx(durable=False):
            # kept: rows of an indexed object that is confirmed under the queued ETag or still on its way
            self.db.execute(
                "DELETE FROM dicom_unshipped WHERE NOT EXISTS (SELECT 1 FROM dicom_objects d WHERE d.path = "
                "dicom_unshipped.path) OR NOT EXISTS (SELECT 1 FROM entries e WHERE e.path = dicom_unshipped.path "
                "AND (e.state != 'clean' OR e.etag = dicom_unshipped.etag))")
            return self.db.execute(
                "SELECT d.path, d.size, u.etag, d.study_uid, d.series_uid, d.sop_uid, d.modality, d.study_date, "
                "d.patient FROM dicom_unshipped u JOIN dicom_objects d ON d.path = u.path "
                "JOIN entries e ON e.path = u.path AND e.etag = u.etag AND e.state = 'clean' AND e.size = d.size "
                "ORDER BY u.path LIMIT ?", (limit,)).fetchall()

    def index_rows_shipped(self, shipped: Sequence[tuple[str, str]]) -> None:
        """These (path, etag) are in a delta in the bucket now; a row queued since under another ETag stays."""
        with self._tx(durable=False):
            self.db.executemany("DELETE FROM dicom_unshipped WHERE path = ? AND etag = ?", shipped)

    def dicom_index_size(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM dicom_objects").fetchone()[0])

    def clear_dicom_index(self) -> None:
        self._write("DELETE FROM dicom_objects", durable=False)

    def find_dicom(self, study: str | None = None, patient: str | None = None, modality: str | None = None,
                   date_from: str | None = None, date_to: str | None = None) -> list[Found]:
        terms = {"d.study_uid = ?": study, "d.patient = ?": patient, "d.modality = ?": modality,
                 "d.study_date >= ?": date_from, "d.study_date <= ?": date_to}
        where = {column: value for column, value in terms.items() if value is not None}
        return self.db.execute(
            "SELECT d.path, d.size, d.study_uid, d.series_uid, d.modality, d.study_date, e.blob IS NOT NULL "
            "FROM dicom_objects d LEFT JOIN entries e ON e.path = d.path"
            + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY d.path", list(where.values())).fetchall()
