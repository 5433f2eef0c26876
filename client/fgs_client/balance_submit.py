"""Submitting a balance run's jobs: every job in a batch (POST /v1/batches), so that the service's batch views
of the run's recorded batches cover every job it submitted, retries and jobs sent alone included.

A chunk of the plan is one batch. When the tenant's queue cannot take a chunk whole (429), its jobs go as batches
of one, as room frees up; a retry is a batch of one too. Every Idempotency-Key derives from the plan fingerprint,
so a client killed between the POST and the state's commit gets the same jobs back on its rerun.
"""

from __future__ import annotations

from collections.abc import Callable

from fgs_client.balance_inputs import RunInputs
from fgs_client.balance_planner import JobSlot
from fgs_client.balance_state import BalanceState, JobRow
from fgs_client.http_client import ApiError, Client
from fgs_common.wire import BatchAccepted, GenerateRequest


class Submitter:
    """Submits the plan's jobs and records each batch with its jobs in the state, in one transaction."""

    def __init__(self, client: Client, inputs: RunInputs, by_key: dict[str, JobSlot], fingerprint: str):
        self.client = client
        self.inputs = inputs
        self.by_key = by_key
        self.fingerprint = fingerprint

    def _idempotency_key(self, suffix: str) -> str:
        return f"fgs-balance-{self.fingerprint[:32]}-{suffix}"

    def _request(self, state: BalanceState, key: str) -> GenerateRequest:
        return self.inputs.request(state, self.by_key[key])

    def submit_chunk(self, state: BalanceState, chunk: int, collect_some: Callable[[], None]) -> None:
        """Submit a chunk's pending jobs as one batch; when the tenant's queue cannot take it whole, job by job as
        room frees up (`collect_some` collects results of the run's own queued jobs, which frees room)."""
        rows = [r for r in state.chunk_rows(chunk) if r.state == "pending"]
        if not rows:
            return
        try:
            requests, accepted = self.inputs.submit_current(
                state,
                lambda: [self._request(state, r.key) for r in rows],
                lambda requests: self.client.submit_batch(
                    requests, idempotency_key=self._idempotency_key(f"chunk-{chunk}"), wait_when_full=False
                ),
            )
        except ApiError as error:
            if error.status != 429:
                raise
            self._submit_one_by_one(state, rows, collect_some)
            return
        self._record(state, rows, requests, accepted)

    def _submit_one_by_one(self, state: BalanceState, rows: list[JobRow], collect_some: Callable[[], None]) -> None:
        for row in rows:
            request = self._request(state, row.key)
            while True:
                # With none of our jobs in the queue, only others' work can free room: wait as the service says.
                ours_queued = bool(state.active(1))
                try:
                    request, accepted = self._submit_alone(state, row.key, 0, first=request, wait=not ours_queued)
                    break
                except ApiError as error:
                    if error.status != 429 or not ours_queued:
                        raise
                    collect_some()  # the queue is full of our own jobs: collect some results, then try again
            self._record(state, [row], [request], accepted)

    def resubmit(self, state: BalanceState, row: JobRow, attempt: int) -> None:
        """A failed job's next attempt, as a batch of one. Built afresh rather than replayed from row.request:
        ids the service lost since are uploaded again."""
        _request, accepted = self._submit_alone(state, row.key, attempt)
        state.record_resubmitted(row.key, attempt, self._job_ids(accepted, 1)[0], accepted.batch_id)

    def _submit_alone(
        self, state: BalanceState, key: str, attempt: int, first: GenerateRequest | None = None, wait: bool = True
    ) -> tuple[GenerateRequest, BatchAccepted]:
        """One job as a batch of its own (the key names the job and its attempt)."""
        return self.inputs.submit_current(
            state,
            lambda: self._request(state, key),
            lambda request: self.client.submit_batch(
                [request], idempotency_key=self._idempotency_key(f"{key}-a{attempt}"), wait_when_full=wait
            ),
            first=first,
        )

    def _record(
        self, state: BalanceState, rows: list[JobRow], requests: list[GenerateRequest], accepted: BatchAccepted
    ) -> None:
        job_ids = self._job_ids(accepted, len(requests))
        state.record_batch_submitted(
            accepted.batch_id,
            [(r.key, job_id, req.model_dump_json()) for r, job_id, req in zip(rows, job_ids, requests, strict=True)],
        )

    @staticmethod
    def _job_ids(accepted: BatchAccepted, sent: int) -> list[str]:
        """The batch's job ids, when there are as many as requests sent."""
        if len(accepted.job_ids) != sent:
            raise ApiError(500, "batch_mismatch", f"sent {sent} jobs, the service accepted {len(accepted.job_ids)}")
        return accepted.job_ids
