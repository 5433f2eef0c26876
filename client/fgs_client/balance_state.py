"""The resumable state of one balance run: a SQLite file in the output directory.

Every change is one committed transaction, so a client killed at any instant leaves a consistent state:
jobs of a chunk get their server ids in the same transaction, uploads are remembered by sha256,
and a job is `done` only after all its images lie on disk under their final names.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fgs_common.exceptions import UserInputError

STATE_NAME = ".fgs-balance.sqlite"  # a file, not a folder: ImageFolder-style loaders would read a folder as a class

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (sha256 TEXT PRIMARY KEY, image_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    ord INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    num_images INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | submitted | done | failed | canceled
    attempt INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    batch_id TEXT,
    request TEXT,
    results TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, ord);
-- every batch the run submitted (a chunk, a job submitted alone when the queue was full, a retry), in order: what
-- the service's batch views of the run are; a job's row names only the batch of its latest attempt
CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY);
"""


class StateConflict(UserInputError):
    """The output directory holds the state of a different plan."""


@dataclass(frozen=True)
class JobRow:
    key: str
    ord: int
    chunk: int
    num_images: int
    state: str
    attempt: int
    job_id: str | None
    batch_id: str | None
    request: str | None
    results: list[dict] | None
    error: str | None


class BalanceState:
    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        had_batches = self._db.execute("SELECT 1 FROM sqlite_master WHERE name='batches'").fetchone() is not None
        self._db.executescript(SCHEMA)
        if not had_batches:  # a state file of an earlier version (or a new one): the batches its jobs name
            self._db.execute("INSERT INTO batches SELECT DISTINCT batch_id FROM jobs WHERE batch_id IS NOT NULL")

    def close(self) -> None:
        self._db.close()

    # -------------------------------------------------------------- plan

    def bind_plan(self, fingerprint: str, slots: list[tuple[str, int, int]], chunk_size: int) -> None:
        """Record the plan's jobs (key, ord, num_images) on the first run; refuse a different plan later."""
        row = self._db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        if row is not None:
            if row[0] != fingerprint:
                raise StateConflict(
                    f"{self.path.parent} holds a balance run with a different plan (dataset, target or "
                    "generation settings changed); "
                    f"use another --out, or delete {self.path.name} there to start over"
                )
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO jobs (key, ord, chunk, num_images) VALUES (?, ?, ?, ?)",
                [(key, ord_, ord_ // chunk_size, n) for key, ord_, n in slots],
            )
            self._db.execute("INSERT INTO meta (key, value) VALUES ('fingerprint', ?)", (fingerprint,))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -------------------------------------------------------------- uploads

    def uploaded_id(self, sha256: str) -> str | None:
        row = self._db.execute("SELECT image_id FROM uploads WHERE sha256=?", (sha256,)).fetchone()
        return row[0] if row else None

    def record_upload(self, sha256: str, image_id: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO uploads (sha256, image_id) VALUES (?, ?)", (sha256, image_id))

    def forget_uploads_except(self, image_ids: set[str]) -> int:
        """Forget the saved uploads whose id is not in `image_ids` (the service no longer has them: their tenant
        deleted them), so that they are uploaded again; returns how many were forgotten."""
        saved = [row[0] for row in self._db.execute("SELECT image_id FROM uploads")]
        gone = [(image_id,) for image_id in saved if image_id not in image_ids]
        self._db.executemany("DELETE FROM uploads WHERE image_id=?", gone)
        return len(gone)

    def forget_meta_value(self, value: str) -> None:
        """Forget every meta entry that saved `value` (an uploaded classifier's id the service no longer has)."""
        self._db.execute("DELETE FROM meta WHERE value=? AND key<>'fingerprint'", (value,))

    # -------------------------------------------------------------- jobs

    def _rows(self, sql: str, args: tuple = ()) -> list[JobRow]:
        rows = self._db.execute(
            "SELECT key, ord, chunk, num_images, state, attempt, job_id, batch_id, request, results, error FROM jobs "
            + sql,
            args,
        ).fetchall()
        return [JobRow(*r[:9], json.loads(r[9]) if r[9] else None, r[10]) for r in rows]

    def pending_chunks(self) -> list[int]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT chunk FROM jobs WHERE state='pending' ORDER BY chunk")]

    def chunk_rows(self, chunk: int) -> list[JobRow]:
        return self._rows("WHERE chunk=? ORDER BY ord", (chunk,))

    def record_batch_submitted(self, batch_id: str | None, submitted: list[tuple[str, str, str]]) -> None:
        """(key, job_id, request JSON) for every job of a batch, and the batch, in one transaction (None: jobs an
        earlier client version submitted outside any batch)."""
        with self._db:
            self._db.execute("BEGIN")
            if batch_id is not None:
                self._db.execute("INSERT OR IGNORE INTO batches (batch_id) VALUES (?)", (batch_id,))
            self._db.executemany(
                "UPDATE jobs SET state='submitted', job_id=?, batch_id=?, request=? WHERE key=? AND state='pending'",
                [(job_id, batch_id, request, key) for key, job_id, request in submitted],
            )

    def active(self, limit: int) -> list[JobRow]:
        return self._rows("WHERE state='submitted' ORDER BY ord LIMIT ?", (limit,))

    def active_in_batches(self, batch_ids: list[str]) -> dict[str, int]:
        """batch id -> how many of the run's submitted (not yet collected) jobs it holds."""
        if not batch_ids:
            return {}
        marks = ",".join("?" * len(batch_ids))
        sql = f"SELECT batch_id, COUNT(*) FROM jobs WHERE state='submitted' AND batch_id IN ({marks}) GROUP BY batch_id"
        return dict(self._db.execute(sql, batch_ids).fetchall())

    def batch_ids(self) -> list[str]:
        """Every batch the run submitted, oldest first."""
        return [r[0] for r in self._db.execute("SELECT batch_id FROM batches ORDER BY rowid")]

    def record_done(self, key: str, job_id: str, results: list[dict]) -> None:
        self._db.execute(
            "UPDATE jobs SET state='done', job_id=?, results=?, error=NULL WHERE key=?",
            (job_id, json.dumps(results), key),
        )

    def record_resubmitted(self, key: str, attempt: int, job_id: str, batch_id: str) -> None:
        """A retry: the job's new attempt, in its own batch, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR IGNORE INTO batches (batch_id) VALUES (?)", (batch_id,))
            self._db.execute(
                "UPDATE jobs SET state='submitted', attempt=?, job_id=?, batch_id=? WHERE key=?",
                (attempt, job_id, batch_id, key),
            )

    def record_failed(self, key: str, error: str) -> None:
        self._db.execute("UPDATE jobs SET state='failed', error=? WHERE key=?", (error, key))

    def record_canceled(self, key: str, error: str) -> None:
        """Canceled on the service (the page, the API, `fgs-client cancel`): never resubmitted by this run."""
        self._db.execute("UPDATE jobs SET state='canceled', error=? WHERE key=?", (error, key))

    def reopen_failed(self) -> set[str]:
        """A rerun gives failed and canceled jobs another round of retries; returns their keys (a canceled job
        among them is resubmitted: rerunning is how a user asks for it)."""
        with self._db:
            self._db.execute("BEGIN")
            keys = {r[0] for r in self._db.execute("SELECT key FROM jobs WHERE state IN ('failed', 'canceled')")}
            self._db.execute("UPDATE jobs SET state='submitted' WHERE state IN ('failed', 'canceled')")
        return keys

    def mark_canceled(self, error: str) -> int:
        """Every submitted job canceled at once (`fgs-client cancel`, which holds the run): returns how many."""
        return self._db.execute("UPDATE jobs SET state='canceled', error=? WHERE state='submitted'", (error,)).rowcount

    def rows(self, state: str | None = None) -> list[JobRow]:
        return self._rows("WHERE state=? ORDER BY ord", (state,)) if state else self._rows("ORDER BY ord")

    def counts(self) -> dict[str, tuple[int, int]]:
        """state -> (jobs, images)."""
        return {
            s: (n, i)
            for s, n, i in self._db.execute("SELECT state, COUNT(*), SUM(num_images) FROM jobs GROUP BY state")
        }
