"""fgs_worker: the worker process, model loading, the sampler."""

import logging

import fgs_common.rq_adapter  # noqa: F401  (first: it sets RQ's key prefix before rq is imported)


class _KnownTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that `CLIPImageProcessor` falls back to its PIL form without torchvision.

    diffusers' unCLIP module names that class at import; torchvision cannot be installed beside the pinned CPU
    torch (README), and the PIL processor is the one every fgs worker loads by name (model_loading). The notice
    would tell an operator to install what breaks the worker. Every other library message still passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_KnownTorchvisionNotice())
