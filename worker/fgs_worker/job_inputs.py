"""Loading a job's inputs: its conditioning images and its classifier (resident LRU; a first load is checked in
the sandbox first), and the limit only the worker's model knows (the pixel limit, fgs_common.pixel_limit). The
rest of the inputs the sampler checks itself (`GuidedDDIMSampler.check_inputs`, before any model work)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from PIL import Image

from fgs_common.classifier_sandbox import check_scratch, run_classifier_check
from fgs_common.exceptions import ArtifactGone, InvalidClassifier, InvalidJob
from fgs_common.pixel_limit import over_pixel_limit
from fgs_common.wire import ClassifierSpec, ModelInfo
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.job_claim import BatchMember
from fgs_worker.runtime import WorkerRuntime


def _load_classifier(runtime: WorkerRuntime, tenant: str, classifier_id: str) -> ConfinedClassifier:
    gone = ArtifactGone(
        f"classifier {classifier_id} is no longer in the artifact store (deleted by its tenant?): upload it again"
    )
    folder = runtime.store.classifier_dir(tenant, classifier_id)
    if folder is None:
        raise gone
    try:
        spec_bytes = (folder / "spec.json").read_bytes()
    except FileNotFoundError:  # deleted since classifier_dir found it
        raise gone from None
    spec = ClassifierSpec.model_validate_json(spec_bytes)

    def load() -> ConfinedClassifier:
        # First load in this worker: run the archive in the sandbox first. The API checked it too, unless it runs
        # without torch (FGS_CLASSIFIER_CHECK). Then its confined process (fgs_worker.confined_classifier) loads
        # it: this process never does. The check and the child read one private copy of the archive (the child
        # through an open file, which outlives the copy's folder), so what runs is what was checked, and a
        # delete by the tenant in between is an ArtifactGone, not a retried error. The statistics are data, not
        # code: the child reads them through an open file of the store's copy.
        with check_scratch(Path(tempfile.gettempdir())) as scratch:  # a dead worker's is swept at start-up
            try:
                stored = runtime.store.classifier_archive(folder)
                archive = scratch / f"classifier{stored.suffix}"
                shutil.copyfile(stored, archive)
            except FileNotFoundError:
                raise gone from None
            stats = folder / "hardness.safetensors"
            stats = stats if stats.exists() else None
            if not folder.exists():  # deleted meanwhile: not loaded (and cached) without its statistics
                raise gone
            spec_path = scratch / "spec.json"
            spec_path.write_bytes(spec_bytes)
            outcome = run_classifier_check(archive, spec_path, stats, runtime.settings, scratch, on_wait=runtime.beat)
            if not outcome.ok:
                raise InvalidClassifier(outcome.message)
            classifier = ConfinedClassifier(archive, spec, stats, runtime.settings, on_wait=runtime.beat)
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
