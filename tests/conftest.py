"""Shared fixtures: a private redis-server, the tiny model, and a live stack (uvicorn + worker subprocesses).

Everything is real: no Redis, API or worker is mocked. Tests never touch the Redis on 6379: each session starts
its own redis-server on a free port with persistence off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fgs_service.redis_server import start_redis_server, stop_redis_server
from support.stack import start_stack


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
