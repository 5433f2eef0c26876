"""A worker starts without library notices an operator cannot act on (issue 23, item 7): transformers' torchvision
fallback (torchvision cannot be installed beside the pinned CPU torch), diffusers' accelerate notice, progress bars.
"""

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack  # a child process of its own


def test_loading_the_embedded_model_prints_nothing():
    code = (
        "from fgs_worker.model_loading import load_pipeline\n"
        "pipeline = load_pipeline('fgs-digits')\n"
        "print(type(pipeline.feature_extractor).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "CLIPImageProcessorPil"
    assert result.stderr == "", result.stderr[-2000:]
