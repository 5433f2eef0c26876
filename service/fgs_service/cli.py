"""The `fgs` command: the whole stack on one machine (`fgs up`), or its processes one by one."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer

from fgs_common.settings import get_settings
from fgs_service.redis_server import start_redis_server, stop_redis_server

app = typer.Typer(help="fgs: feedback-guided data synthesis service", no_args_is_help=True, add_completion=False)


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:  # any failure to connect means "no Redis there"
        return False


def _start_local_redis(state_dir: Path) -> tuple[subprocess.Popen, str]:
    try:
        # AOF, fsynced every second: a restart finds every queued job (at most the last second is lost)
        return start_redis_server(state_dir / "redis", new_session=True)
    except FileNotFoundError:
        raise typer.BadParameter(
            "no Redis answers and redis-server is not installed: install it or set FGS_REDIS_URL"
        ) from None


def _dev_key(state_dir: Path) -> str:
    path = state_dir / "dev_api_key"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = "fgs-dev-" + secrets.token_urlsafe(24)
    path.write_text(key)
    path.chmod(0o600)
    return key


def _without_password(url: str) -> str:
    """A Redis URL fit to print: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _dev_key_role(settings) -> str:
    from fgs_service.auth import dev_key_is_admin

    if dev_key_is_admin(settings):
        return "FGS_DEV_API_KEY, an admin key: no keys file is given"
    return "FGS_DEV_API_KEY, not an admin key: the keys file names the operators"


def _stop_requested(signum: int, frame) -> None:
    raise KeyboardInterrupt


class Child:
    """One process `fgs up` keeps running: restarted with backoff when it exits, in a process group of its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], backoff_s: list[float]):
        self.name, self.argv, self.env, self.backoff_s = name, argv, env, backoff_s
        self.process: subprocess.Popen | None = None
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None

    def supervise(self, now: float) -> None:
        """Restart the child if it exited and its backoff has passed; schedule the restart if it just exited."""
        if self.process is None or self.process.poll() is None:
            return
        if self.restart_at is None:
            if now - self.started_at > _HEALTHY_RUN_S:
                self.failures = 0
            wait = self.backoff_s[min(self.failures, len(self.backoff_s) - 1)]
            self.failures += 1
            self.restart_at = now + wait
            typer.echo(f"{self.name} exited with {self.process.returncode}; restarting in {wait:g} s", err=True)
        elif now >= self.restart_at:
            self.start()

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group (its own subprocesses too, e.g. classifier checks)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


# A child that ran this long before exiting was healthy: its next restart starts from the shortest backoff.
_HEALTHY_RUN_S = 60.0


def _stop_children(children: list[Child], grace_s: float) -> None:
    """SIGTERM every child's group; SIGKILL whatever still runs after `grace_s` (a stuck or stopped worker)."""
    for child in children:
        child.signal_group(signal.SIGTERM)
        child.signal_group(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    deadline = time.monotonic() + grace_s
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            typer.echo(f"{child.name} did not stop within {grace_s:g} s; killing it", err=True)
        child.signal_group(signal.SIGKILL)  # the group too: no grandchild outlives fgs up
        child.process.wait()


@app.command()
def up(
    host: Annotated[str, typer.Option(help="API bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    workers: Annotated[int, typer.Option(min=0, help="worker processes")] = 1,
    model: Annotated[
        str | None, typer.Option(help="'fgs-digits', 'fgs-digits-contexts' (embedded), 'tiny', or an SD 2.1 unCLIP dir")
    ] = None,
) -> None:
    """API + workers (+ a local redis-server when none is configured or answering). Ctrl-C stops them all.

    A child that exits (a worker ended by its watchdog, killed, out of memory) is restarted with backoff
    (FGS_RESTART_BACKOFF_S); the others keep running. On stop, children get SIGTERM (workers finish their job)
    and FGS_STOP_GRACE_S later SIGKILL.
    """
    # Ctrl-C and SIGTERM both stop everything below. Installed explicitly: a shell starts a background job
    # (`fgs up &` in a script) with SIGINT ignored, and SIGTERM (docker stop, systemd) would otherwise kill
    # this process alone and orphan its children, which run in their own sessions.
    signal.signal(signal.SIGINT, _stop_requested)
    signal.signal(signal.SIGTERM, _stop_requested)
    settings = get_settings()
    env = dict(os.environ)
    children: list[Child] = []
    redis_process = None
    url = settings.redis_url
    if url is None:
        url = settings.default_redis_url
        if not _redis_answers(url):
            redis_process, url = _start_local_redis(settings.state_dir)
            typer.echo(f"started redis-server at {url} (data in {settings.state_dir / 'redis'})")
    elif not _redis_answers(url):
        raise typer.BadParameter(f"FGS_REDIS_URL={url} does not answer")
    env["FGS_REDIS_URL"] = url
    if model:
        env["FGS_MODEL"] = model
    if not (settings.api_keys_file or settings.api_keys or settings.dev_api_key):
        env["FGS_DEV_API_KEY"] = _dev_key(settings.state_dir)
    backoff = settings.restart_backoff_s
    try:
        for i in range(workers):
            children.append(Child(f"worker {i}", [sys.executable, "-m", "fgs_worker.main"], env, backoff))
        api_argv = [sys.executable, "-m", "fgs_service.cli", "api", "--host", host, "--port", str(port)]
        children.append(Child("API", api_argv, env, backoff))
        for child in children:
            child.start()
        typer.echo(
            f"fgs API on http://{host}:{port} with {workers} worker(s), model {env.get('FGS_MODEL', settings.model)}"
        )
        joined = "started above" if redis_process else "joined: it was answering already"
        typer.echo(  # what it joined: two deployments on one Redis differ by their key prefix
            f"Redis {_without_password(url)} ({joined}), key prefix {settings.redis_prefix} (RQ's: "
            f"{env.get('RQ_KEY_PREFIX', 'rq')}), data {settings.data_dir.resolve()}, "
            f"state {settings.state_dir.resolve()}"
        )
        if "FGS_DEV_API_KEY" in env:
            typer.echo(f"API key: {env['FGS_DEV_API_KEY']} ({_dev_key_role(settings)})")
        while True:
            now = time.monotonic()
            for child in children:
                child.supervise(now)
            time.sleep(0.5)
    except KeyboardInterrupt:
        typer.echo("stopping (workers finish their current job)...")
    finally:
        _stop_children(children, settings.stop_grace_s)
        if redis_process is not None:
            stop_redis_server(redis_process)


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """The HTTP API alone (FGS_REDIS_URL must be set), with header and keep-alive timeouts."""
    import uvicorn

    from fgs_service.http_protocol import HeaderTimeoutH11Protocol

    settings = get_settings()
    uvicorn.run(
        "fgs_service.app:create_app",
        factory=True,
        host=host,
        port=port,
        http=HeaderTimeoutH11Protocol,
        timeout_keep_alive=settings.http_keep_alive_s,
    )


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="model to keep resident (default FGS_MODEL)")] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="file written once the model is loaded, removed on exit (for probes)")
    ] = None,
) -> None:
    """One worker process (FGS_REDIS_URL must be set)."""
    if model:
        os.environ["FGS_MODEL"] = model
    # exec, not import: the service package never imports the worker (docs/ARCHITECTURE.md, import rules)
    argv = [sys.executable, "-m", "fgs_worker.main"] + (["--ready-file", str(ready_file)] if ready_file else [])
    os.execv(sys.executable, argv)


@app.command("make-tiny-model")
def make_tiny_model(directory: Path) -> None:
    """Write the random-weight tiny unCLIP pipeline to DIRECTORY (offline)."""
    result = subprocess.run([sys.executable, "-m", "fgs_worker.tiny_model", str(directory)])
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    typer.echo(f"tiny model written to {directory}")


@app.command("hash-key")
def hash_key_command(api_key: str) -> None:
    """Print the sha256 of an API key, for the keys file."""
    from fgs_service.auth import hash_key

    typer.echo(hash_key(api_key))


if __name__ == "__main__":
    app()
