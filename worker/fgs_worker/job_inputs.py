"""Loading a job's inputs: its conditioning images and its classifier (resident LRU; a first load is checked in
the sandbox first), and the limit only the worker's model knows (the pixel limit, fgs_common.pixel_limit). The
rest of the inputs the sampler checks itself (`GuidedDDIMSampler.check_inputs`, before any model work)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fgs_common.classifier_acceptance import checked_stored_copy, stored_classifier
from fgs_common.exceptions import ArtifactGone, InvalidJob
from fgs_common.pixel_limit import over_pixel_limit
from fgs_common.wire import ModelInfo
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.job_claim import BatchMember
from fgs_worker.runtime import WorkerRuntime


def _load_classifier(runtime: WorkerRuntime, tenant: str, classifier_id: str) -> ConfinedClassifier:
    stored = stored_classifier(runtime.store, tenant, classifier_id)

    def load() -> ConfinedClassifier:
        # First load in this worker: the archive passes acceptance first (fgs_common.classifier_acceptance: a
        # private copy checked in the sandbox; the API checked it too, unless it runs without torch). Then its
        # confined process (fgs_worker.confined_classifier) loads it: this process never does. The child reads the
        # checked copy through an open file, which outlives the copy's folder, so what runs is what was checked.
        with checked_stored_copy(stored, runtime.settings, on_wait=runtime.beat) as checked:
            classifier = ConfinedClassifier(
                checked.archive, stored.spec, checked.stats, runtime.settings, on_wait=runtime.beat
            )
        try:
            classifier.start()
        except BaseException:
            classifier.close()
            raise
        return classifier

    return runtime.classifiers.get(f"{tenant}/{classifier_id}", load)


def conditioning_images(runtime: WorkerRuntime, tenant: str, image_ids: list[str]) -> list[Image.Image]:
    """The job's conditioning images, each read once, in request order."""
    loaded: dict[str, Image.Image] = {}
    for image_id in image_ids:
        if image_id not in loaded:
            path: Path | None = runtime.store.image_path(tenant, image_id)
            if path is None:
                raise ArtifactGone(f"conditioning image {image_id} is no longer in the artifact store")
            with Image.open(path) as image:
                loaded[image_id] = image.convert("RGB")
    return [loaded[i] for i in image_ids]


def load_inputs(runtime: WorkerRuntime, member: BatchMember, model: ModelInfo) -> None:
    """Load what the member's images need; raise InvalidJob when it cannot run on `model` (too large an image, an
    artifact gone, a classifier that does not pass its check)."""
    request = member.request
    member.conditioning = conditioning_images(runtime, member.tenant, request.conditioning_image_ids)
    if request.classifier_id:
        member.classifier = _load_classifier(runtime, member.tenant, request.classifier_id)
    too_large = over_pixel_limit(member.params.width, member.params.height, model)
    if too_large is not None:
        raise InvalidJob(too_large)
