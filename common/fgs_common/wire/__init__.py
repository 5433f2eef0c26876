"""The wire format of fgs API v1: the one definition, imported by service, worker and client as `fgs_common.wire`.

Pulls in neither torch nor FastAPI. One module per schema family, a base extended by request and response models
where a family has both: `generation` (GenerationParams -> GenerateRequest, ModelInfo), `jobs` (JobBase ->
JobPublic, progress, the jobs list), `batches`, `uploads` (images and classifiers), `errors`, `views` (the page's
read-only views).
Everyone else imports from here, never from a family's module (tests/test_import_rules.py holds that): a model
moves between families without an import changing. Each id has one name everywhere on the wire: `job_id`,
`batch_id`, `image_id`, `classifier_id` (tests/test_service_openapi_ids.py walks the OpenAPI document for it).
"""

from fgs_common.wire.batches import BatchAccepted, BatchCanceled, BatchCreate, BatchPublic
from fgs_common.wire.errors import ErrorBody, ErrorResponse
from fgs_common.wire.generation import (
    GENERATE_EXAMPLE,
    MAX_CLASS_INDEX,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES_PER_JOB,
    MAX_SEED,
    STORED,
    ClassIndex,
    Criterion,
    DropoutScaling,
    FeedbackInput,
    FeedbackResolution,
    GenerateRequest,
    GenerationParams,
    GradientPath,
    ModelInfo,
    Prompt,
)
from fgs_common.wire.jobs import (
    MAX_LIST_OFFSET,
    ImageResult,
    JobAccepted,
    JobBase,
    JobListQuery,
    JobProgress,
    JobProgressEvent,
    JobPublic,
    JobsPublic,
    JobState,
)
from fgs_common.wire.uploads import (
    CLASSIFIER_SPEC_EXAMPLE,
    ClassifierOutput,
    ClassifierSpec,
    ClassifierUploaded,
    ImageUploaded,
)
from fgs_common.wire.views import (
    ClassCount,
    ClassName,
    CompareGrid,
    CompareRow,
    CompareRows,
    FailedJob,
    GalleryItem,
    GalleryPage,
    GallerySort,
    JobSummaries,
    OperatorOverview,
    SeedText,
    TenantLoadPublic,
    ThroughputMinute,
    WorkerPublic,
)
