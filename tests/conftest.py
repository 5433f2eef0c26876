"""Shared fixtures: a private redis-server, the tiny model, and a live stack (uvicorn + worker subprocesses); and
the layers every test is sorted into.

Everything is real: no Redis, API or worker is mocked. Tests never touch the Redis on 6379: each session starts
its own redis-server on a free port with persistence off.

Layers (pytest markers, `-m unit` selects one):
- unit: in one process, no Redis. Enforced: a unit test that starts a process or reaches a server over TCP fails
  (a connection refused is no contact: a test may check what happens when nothing answers).
- redis: uses the session's private redis-server (`redis_server`); our own components may start their children
  (the classifier sandbox), the test starts no stack.
- stack: starts processes: uvicorn and workers (`live_stack`, `start_stack`), `fgs up`, the CLIs, the classifier
  sandbox, a fresh interpreter, outside tools.
A test is sorted by an explicit marker (on the test or the module's `pytestmark`), else by what it uses: the
`live_stack` fixture or a module that imports the stack helpers -> stack; the `redis_server` fixture -> redis;
anything else -> unit. Across the layers, `model` marks the tests that run the diffusion model in process
(minutes of CPU). `./scripts/test.sh --fast` runs `-m "unit and not model"`.

Run order: whole modules, those that start processes first, then the in-process model modules, then the rest
(`pytest_collection_modifyitems`); `./scripts/test.sh` hands them out in that order to one test process per CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from fgs_service.redis_server import start_redis_server, stop_redis_server
from support.stack import start_stack

LAYERS = ("unit", "redis", "stack")
STACK_FIXTURES = {"live_stack"}
REDIS_FIXTURES = {"redis_server"}
# a module that imports one of these starts a stack or a CLI process itself
STACK_HELPERS = {"start_stack", "spawn_api", "spawn_worker", "client_process"}
LAYER = pytest.StashKey[str]()


def layer_of(item: pytest.Item) -> str:
    """The item's layer: its closest explicit layer marker, else what its fixtures and module use."""
    for marker in item.iter_markers():
        if marker.name in LAYERS:
            return marker.name
    fixtures = set(item.fixturenames)
    module = getattr(item, "module", None)
    if fixtures & STACK_FIXTURES or (module is not None and STACK_HELPERS & set(vars(module))):
        return "stack"
    if fixtures & REDIS_FIXTURES:
        return "redis"
    return "unit"


def run_rank(item: pytest.Item) -> int:
    """Where the item's module runs: process-starting modules first, in-process model modules next, the short
    in-process ones last (see `pytest_collection_modifyitems`)."""
    layer = item.stash[LAYER]
    return 0 if layer == "stack" else 1 if item.get_closest_marker("model") else 2 if layer == "redis" else 3


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = layer_of(item)
        item.stash[LAYER] = layer
        if item.get_closest_marker(layer) is None:
            item.add_marker(layer)
    # Whole modules in the order of their most expensive layer, collection order within a rank and a module.
    # scripts/test.sh hands modules to its test processes in this order (pytest-xdist, --dist loadfile): the long
    # stack modules start early and the short unit modules fill the end, so no process idles while the other runs
    # one long test alone (xdist's own order, most tests first, left the two longest, one test each, to the end).
    rank: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        rank[item.path] = min(rank.get(item.path, 3), run_rank(item))
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (rank[item.path], first[item.path]))


def _refuse(what: str):
    def refuse(*args, **kwargs):
        pytest.fail(
            f"a unit test {what} ({args[0] if args else ''!r}): unit tests run in one process without Redis. Use the "
            "redis_server or live_stack fixture, or mark the test (or its module's pytestmark) "
            "pytest.mark.redis / pytest.mark.stack (layers: tests/conftest.py)"
        )

    return refuse


def _refuse_child(popen, args, *rest, **kwargs):
    _refuse("started a process")(args)


@contextmanager
def unit_isolation():
    """Starting a process or reaching a server over TCP fails the test (a unit test that does either is
    misclassified)."""
    import _posixsubprocess  # what multiprocessing starts a child with

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def reached(sock: socket.socket, address) -> None:
        sock.close()
        _refuse("reached a server over TCP")(address)

    def connect(self, address):
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return real_connect(self, address)
        if self.gettimeout() == 0.0:  # non-blocking (asyncio): whether it is reached shows only later
            _refuse("opened a non-blocking TCP connection")(address)
        real_connect(self, address)  # refused: the OSError goes to the code under test, as without the guard
        reached(self, address)

    def connect_ex(self, address):
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return real_connect_ex(self, address)
        if self.gettimeout() == 0.0:
            _refuse("opened a non-blocking TCP connection")(address)
        error = real_connect_ex(self, address)
        if error == 0:
            reached(self, address)
        return error

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", _refuse_child)
        patch.setattr(_posixsubprocess, "fork_exec", _refuse("started a process"))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, _refuse(f"started a process with os.{name}"))
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if item.stash.get(LAYER, None) != "unit":
        return (yield)
    with unit_isolation():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if item.stash.get(LAYER, None) != "unit":
        return (yield)
    with unit_isolation():
        return (yield)


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server for the session; yields its URL."""
    process, url = start_redis_server()
    yield url
    stop_redis_server(process)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The random-weight tiny unCLIP pipeline, built once per session."""
    from fgs_worker.tiny_model import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(directory)
    return directory


@pytest.fixture(scope="session")
def classifier_files(tmp_path_factory):
    """A random-weight SmallCNN (10 classes, 32x32 RGB) as TorchScript, and its ClassifierSpec."""
    from fgs_classifier.small_cnn import random_small_cnn

    directory = tmp_path_factory.mktemp("classifier")
    return random_small_cnn(directory, num_classes=10, input_size=32, seed=0)


@pytest.fixture(scope="session")
def live_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """uvicorn + 2 workers on the tiny model; tenants alpha, beta and capped (cap CAPPED_MAX_IMAGES)."""
    stack = start_stack(redis_server, tiny_model_dir, tmp_path_factory.mktemp("stack"), workers=2)
    yield stack
    stack.close()
