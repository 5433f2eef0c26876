"""Collecting a balance run's jobs: the service is asked per batch (GET /v1/batches/{batch_id}: counts by state), and
only a batch in which more jobs ended than the run has collected has its jobs read one by one (GET /v1/jobs/{job_id},
which carries the results); finished jobs are downloaded (temp name + rename), failed ones retried, and jobs
canceled on the service recorded as canceled, never resubmitted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from fgs_client.balance_planner import JobSlot
from fgs_client.balance_progress import ProgressLine
from fgs_client.balance_state import BalanceState, JobRow
from fgs_client.balance_submit import Submitter
from fgs_client.dataset_readers import ScannedDataset
from fgs_client.dataset_writer import write_png_atomic
from fgs_client.http_client import ApiError, Client
from fgs_common.wire import BatchPublic, JobPublic, JobState

# A batch's counts are the stored states as they are; a job whose worker died hard is recorded failed only when
# it is read on its own (GET /v1/jobs/{job_id} reconciles it with RQ). So every so many polls, the oldest jobs are
# read one by one whatever their batch says.
FULL_LOOK_EVERY = 20


def synthetic_rel_path(dataset: ScannedDataset, slot: JobSlot, index: int) -> str:
    directory = dataset.layout.synthetic_dir(dataset, slot.entry.class_index, slot.entry.group)
    name = f"{slot.file_stem}_{index:03d}.png"
    return f"{directory}/{name}" if directory else name


def newly_ended(batch: BatchPublic, active: int) -> int:
    """Jobs of the batch that ended (or whose record expired) and that the run has not collected: `active` is how
    many of its jobs the run's state still holds as submitted."""
    ended = sum(count for state, count in batch.counts.items() if state.is_terminal)
    expired = len(batch.job_ids) - sum(batch.counts.values())  # GET /v1/jobs/{job_id} answers 404 for them
    return ended + expired - (len(batch.job_ids) - active)


class Collector:
    """Polls the run's submitted jobs, oldest first, a window at a time (BalanceOptions.window)."""

    def __init__(
        self,
        client: Client,
        dataset: ScannedDataset,
        out: Path,
        by_key: dict[str, JobSlot],
        submitter: Submitter,
        *,
        window: int,
        max_retries: int,
        reopened: set[str],
        progress: ProgressLine,
        check_stop: Callable[[], None],
    ):
        self.client = client
        self.dataset = dataset
        self.out = out
        self.by_key = by_key
        self.submitter = submitter
        self.window = window
        self.max_retries = max_retries
        self.reopened = reopened  # failed or canceled before this rerun: resubmitted when found ended
        self.progress = progress
        self.check_stop = check_stop  # RunStopped when `fgs-client cancel` asked for the run
        self.failures: list[tuple[str, str]] = []
        self.retries_this_run: dict[str, int] = {}
        self.retried = 0
        self.generated: list[tuple[float, float, int]] = []  # (started, finished, images) of jobs collected now
        self._running = 0  # jobs running at the last poll: "generating" rather than "waiting for a worker"
        self._polls = 0

    def poll_once(self, state: BalanceState) -> bool:
        """One look at the oldest submitted jobs; True when any of them moved on."""
        self.check_stop()
        self._running = 0
        self._polls += 1
        moved = False
        for rows, expected in self._rows_to_read(state):
            found = 0
            for row in rows:
                images = self._read(state, row)
                if images is None:
                    continue
                moved, found = True, found + 1
                self.progress.advance(images, len(self.failures))
                if found >= expected:  # jobs run about in order: the ended ones are mostly the first
                    break
        self.progress.describe("generating" if self._running or moved else "waiting for a worker")
        return moved

    def _rows_to_read(self, state: BalanceState) -> Iterator[tuple[list[JobRow], int]]:
        """(the window's jobs of one batch, how many of them ended) for each batch where jobs ended; a batch the
        service no longer knows, and jobs an earlier client version submitted outside any batch, whole."""
        rows = state.active(self.window)
        if self._polls % FULL_LOOK_EVERY == 0:
            yield rows, len(rows)
            return
        by_batch: dict[str | None, list[JobRow]] = {}
        for row in rows:
            by_batch.setdefault(row.batch_id, []).append(row)
        if unbatched := by_batch.pop(None, []):
            yield unbatched, len(unbatched)
        active = state.active_in_batches(list(by_batch))
        for batch_id, batch_rows in by_batch.items():
            try:
                batch = self.client.batch(batch_id)
            except ApiError as error:
                if error.status != 404:  # the batch record expired: its jobs one by one
                    raise
                yield batch_rows, len(batch_rows)
                continue
            self._running += batch.counts.get(JobState.running, 0)
            ended = newly_ended(batch, active.get(batch_id, 0))
            if ended > 0:
                yield batch_rows, ended

    def _read(self, state: BalanceState, row: JobRow) -> int | None:
        """Read one submitted job; returns images newly completed (0 for a retry or failure), None if unchanged."""
        try:
            job = self.client.job(row.job_id)
        except ApiError as error:
            if error.status != 404:
                raise
            return self._retry_or_fail(state, row, f"job {row.job_id} is unknown to the service (404)")
        self._running += job.state is JobState.running
        if job.state is JobState.finished:
            self._download(state, row, job)
            return row.num_images
        if job.state is JobState.canceled and row.key not in self.reopened:
            # Someone canceled it on the service (the page, the API): never resubmitted behind their back.
            state.record_canceled(row.key, f"job {job.job_id} was canceled on the service")
            return 0
        if job.state in (JobState.failed, JobState.canceled):
            self.reopened.discard(row.key)  # a rerun resubmits a job canceled before it, once
            message = job.error.message if job.error else job.state.value
            return self._retry_or_fail(state, row, f"job {job.job_id} {job.state.value}: {message}")
        return None

    def _retry_or_fail(self, state: BalanceState, row: JobRow, message: str) -> int:
        used = self.retries_this_run.get(row.key, 0)
        if used >= self.max_retries:
            state.record_failed(row.key, message)
            self.failures.append((row.key, message))
            return 0
        slot = self.by_key[row.key]
        for index in range(slot.num_images):  # a new attempt rewrites the slot's images as a whole
            (self.out / synthetic_rel_path(self.dataset, slot, index)).unlink(missing_ok=True)
        self.submitter.resubmit(state, row, row.attempt + 1)
        self.retries_this_run[row.key] = used + 1
        self.retried += 1
        return 0

    def _download(self, state: BalanceState, row: JobRow, job: JobPublic) -> None:
        slot = self.by_key[row.key]
        if len(job.results) != slot.num_images:
            raise ApiError(
                500,
                "result_mismatch",
                f"job {job.job_id} finished with {len(job.results)} images, expected {slot.num_images}",
            )
        if job.started_at and job.finished_at:
            self.generated.append((job.started_at.timestamp(), job.finished_at.timestamp(), len(job.results)))
        records = []
        for index, result in enumerate(job.results):
            rel = synthetic_rel_path(self.dataset, slot, index)
            dest = self.out / rel
            if not dest.exists():  # a file under its final name is complete (written by rename)
                write_png_atomic(dest, self.client.image_bytes(result.image_id))
            records.append(
                {
                    "path": rel,
                    "seed": result.seed,
                    "criterion_value": result.criterion_value,
                    "image_id": result.image_id,
                }
            )
        state.record_done(row.key, job.job_id, records)

    def generation_speed(self) -> float | None:
        """Images per second of generation on the service: the images of the jobs this run collected over the
        time from the first one's start to the last one's end (workers' clocks; queueing before the first start
        and the client's own downloads left out, which the progress bar's collection rate counts)."""
        if not self.generated:
            return None
        start = min(started for started, _, _ in self.generated)
        end = max(finished for _, finished, _ in self.generated)
        return sum(images for _, _, images in self.generated) / max(end - start, 1e-3)
