"""fgs_worker: the worker process, model loading, the sampler."""

from fgs_common.job_records import export_rq_key_prefix

export_rq_key_prefix()  # before any module of this package imports rq (fgs_common.job_records says why)
