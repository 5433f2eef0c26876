"""`fgs-client cancel --out DIR`: one DELETE per batch the run submitted, job by job only for jobs submitted singly.

The API in process (TestClient) on the session's redis-server, no workers, so every job stays queued.
"""

from __future__ import annotations

from typer.testing import CliRunner

from fgs_client import cli
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_common.wire import GenerateRequest, JobState
from support.live_calls import recorded_calls
from support.service_settings import in_process_client, service_settings

REQUEST = GenerateRequest(prompt="a digit", class_index=1, steps=2, guidance_every=1)


def test_cancel_deletes_each_batch_once_and_single_jobs_one_by_one(redis_server, tmp_path, monkeypatch):
    with in_process_client(service_settings(redis_server, tmp_path / "data")) as client:
        batch = client.submit_batch([REQUEST, REQUEST.model_copy(update={"seed": 1})])
        single = client.submit(REQUEST.model_copy(update={"seed": 2})).job_id
        out = tmp_path / "out"
        out.mkdir()
        state = BalanceState(out / STATE_NAME)
        state.bind_plan("plan", [("0/0", 0, 1), ("0/1", 1, 1), ("0/2", 2, 1)], chunk_size=3)
        state.record_batch_submitted(batch.batch_id, [("0/0", batch.job_ids[0], "{}"), ("0/1", batch.job_ids[1], "{}")])
        state.record_batch_submitted(None, [("0/2", single, "{}")])
        state.close()

        calls = recorded_calls(client, monkeypatch)
        monkeypatch.setattr(client, "close", lambda: None)
        monkeypatch.setattr(cli, "make_client", lambda url, api_key: client)
        result = CliRunner().invoke(cli.app, ["cancel", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "canceled 3 jobs" in " ".join(result.output.split())
        assert calls == [("DELETE", f"/v1/batches/{batch.batch_id}"), ("DELETE", f"/v1/jobs/{single}")]
        monkeypatch.undo()
        assert {client.job(j).state for j in [*batch.job_ids, single]} == {JobState.canceled}
