"""The failures fgs names, in one place (as rq/exceptions.py does).

The worker decides what to do with a job by the type of the error alone:
- `InvalidJob` and its subclasses: the job can never succeed on any worker (bad arguments, a classifier that
  does not fit, an artifact that is gone for good). The job fails at once with the message; no retry.
- a canceled job, or one this worker lost to another (fgs_common.job_records' fencing), is no error: the step
  callback drops its images from the batch at the next step boundary (fgs_worker.jobs), nothing is raised.
- anything else (a ValueError from inside torch, a file briefly missing on a shared volume, a Redis blip) is
  retried with backoff, up to FGS_JOB_RETRIES times.

`fgs-client` picks its exit code by type as well (one table, fgs_client.cli.EXIT_CODES): a `UserInputError` is
input the user can fix (exit code 2); an error of no named type is a bug and shows its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Input the user can fix (a dataset, a plan, an option, a file, a classifier that does not fit); the message
    says what to fix.

    Not a ValueError: a ValueError from a bug (a pydantic ValidationError among them) must never pass for bad input.
    """


class InvalidJob(UserInputError):
    """A job that cannot succeed on any worker; the message says what to fix."""

    code = "invalid_job"


class InvalidClassifier(InvalidJob):
    """The classifier archive, its spec and its statistics do not fit together (or the archive is gone)."""

    code = "invalid_classifier"


class ClassifierRefused(InvalidClassifier):
    """A step of classifier acceptance (fgs_common.classifier_acceptance) refused the classifier. `reason` is the
    error code the API answers an upload with (`unsafe_classifier_archive`, `classifier_mismatch`, ...); the
    message is fgs's own words, never the check's output. To a worker it is an InvalidClassifier: the job fails."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class InvalidHardnessStats(InvalidClassifier):
    """Hardness statistics a worker could not score with (not a v2 safetensors file, or a tensor that does not
    fit the layout or the file); refused at upload (422) by the same check the worker's reader runs."""

    code = "invalid_hardness_stats"


class UnsafeClassifier(InvalidClassifier):
    """The archive could run code or touch the host if loaded or run; nothing of it was run."""

    code = "unsafe_classifier"


class NotAClassifierArchive(ValueError):
    """The file is not a TorchScript or torch.export archive (fgs_common.classifier_archive)."""


class UnsafeClassifierArchive(ValueError):
    """The archive is a classifier archive, but loading or running it could run code or touch the host
    (fgs_common.classifier_archive, fgs_common.classifier_operators, fgs_classifier.graph_check)."""


class ArchiveTooLarge(ValueError):
    """The archive unpacks to more bytes than fgs accepts (a zip bomb, or simply too big)."""


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
