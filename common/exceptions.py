"""The failures fgs names, in one place (as rq/exceptions.py does).

The worker decides what to do with a job by the type of the error alone:
- `InvalidJob` and its subclasses: the job can never succeed on any worker (bad arguments, a classifier that
  does not fit, an artifact that is gone for good). The job fails at once with the message; no retry.
- a canceled job, or one this worker lost to another (fgs_common.job_records' fencing), is no error: the step
  callback drops its images from the batch at the next step boundary (fgs_worker.jobs), nothing is raised.
- anything else (a ValueError from inside torch, a file briefly missing on a shared volume, a Redis blip) is
  retried with backoff, up to FGS_JOB_RETRIES times.
"""

from __future__ import annotations


class InvalidJob(ValueError):
    """A job that cannot succeed on any worker; the message says what to fix.

    A ValueError, as diffusers' `check_inputs` raises, so callers of the sampler may catch either.
    """

    code = "invalid_job"


class InvalidClassifier(InvalidJob):
    """The classifier archive, its spec and its statistics do not fit together (or the archive is gone)."""

    code = "invalid_classifier"


class UnsafeClassifier(InvalidClassifier):
    """The archive could run code or touch the host if loaded or run; nothing of it was run."""

    code = "unsafe_classifier"


class ArtifactGone(InvalidJob):
    """A conditioning image or classifier the job names is no longer in the artifact store."""

    code = "artifact_gone"


class EnqueueInProgress(Exception):
    """An Idempotency-Key names a request whose enqueue has not completed yet (or was cut off and has not
    expired yet): the caller retries after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"a request with this Idempotency-Key is still being queued; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ClassifierRunFailed(InvalidClassifier):
    """The tenant's classifier failed in its confined process at run time (fgs_worker.confined_classifier): it
    crashed, ran past its deadline or past its memory limit. Its job fails at once (a retry would only repeat it);
    the worker goes on and starts the classifier's process again on its next use."""

    code = "classifier_run_failed"


class ClassifierCrashed(ClassifierRunFailed):
    """The classifier's process ended during a call (a signal such as SIGSEGV, or an exit)."""

    code = "classifier_crashed"


class ClassifierTimedOut(ClassifierRunFailed):
    """The classifier's process did not answer within FGS_CLASSIFIER_CALL_TIMEOUT_S."""

    code = "classifier_timeout"


class ClassifierOutOfMemory(ClassifierRunFailed):
    """The classifier asked for more memory than its process may have (FGS_CLASSIFIER_RUN_MEMORY_BYTES)."""

    code = "classifier_resource_limit"


class ClassifierRaised(RuntimeError):
    """The classifier raised an error in its confined process (a shape it cannot take, say): retried with backoff
    as any error from inside torch is, since the classifier's process stays usable."""

    code = "classifier_error"
