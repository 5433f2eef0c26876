"""A worker starts without library notices an operator cannot act on (issue 23, item 7): transformers' torchvision
fallback (torchvision cannot be installed beside the pinned CPU torch), diffusers' accelerate notice, progress bars.
And the garbage collector, off while the worker imports (fgs_worker.main), is on again after.
"""

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack  # a child process of its own


def test_loading_the_embedded_model_prints_nothing():
    code = (
        "import gc\n"
        "import fgs_worker.main\n"  # what `fgs up` starts; it turns the collector off while it imports
        "from fgs_worker.model_loading import load_pipeline\n"
        "pipeline = load_pipeline('fgs-digits')\n"
        "print(type(pipeline.feature_extractor).__name__, 'collector on:', gc.isenabled())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "CLIPImageProcessorPil collector on: True"
    assert result.stderr == "", result.stderr[-2000:]
