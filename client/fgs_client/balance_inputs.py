"""What a balance run's requests are built from, and the checks before anything is submitted: the prompts against
the model, the classifier against the dataset and on the user's own images (`fgs_client.preflight`), the uploaded
classifier and conditioning images (content-addressed: a known sha256 is never sent twice), and the requests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from PIL import Image
from rich.console import Console

from fgs_client.balance_options import BalanceOptions
from fgs_client.balance_planner import JobSlot
from fgs_client.balance_state import BalanceState
from fgs_client.dataset_readers import RealImage, ScannedDataset, read_classifier_spec
from fgs_client.http_client import ApiError, Client
from fgs_client.preflight import (
    PREFLIGHT_IMAGES_PER_CLASS,
    PREFLIGHT_MAX_IMAGES,
    WELL_FED_ACCURACY,
    match_classes,
    run_preflight,
)
from fgs_common.exceptions import UserInputError
from fgs_common.wire import ClassifierSpec, GenerateRequest, ModelInfo

# The service's 404 for a referenced object (fgs_service.errors.not_found).
_MISSING_ID = re.compile(r"no (image|classifier) with id '([0-9a-f]+)'")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (what the service names an uploaded image by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def conditioning_digests(slots: list[JobSlot]) -> dict[Path, str]:
    """sha256 of every conditioning image the plan's jobs use, by path (each file read once)."""
    paths = dict.fromkeys(image.path for slot in slots for image in slot.conditioning)
    return {path: file_sha256(path) for path in paths}


class RunInputs:
    """The classifier and conditioning images of one run, as ids on the service, and the requests built on them."""

    def __init__(
        self,
        client: Client,
        dataset: ScannedDataset,
        options: BalanceOptions,
        digests: dict[Path, str],
        console: Console,
        say: Callable[[str], None],
    ):
        self.client = client
        self.dataset = dataset
        self.options = options
        self.digests = digests
        self.console = console
        self.say = say
        self.classifier_id: str | None = options.classifier_id
        self.classifier_index = list(range(len(dataset.class_names)))  # dataset class -> classifier output
        self.bad_conditioning: set[Path] = set()  # conditioning files that do not decode
        self._image_ids: dict[Path, str | None] = {}  # conditioning file -> uploaded id, for this run

    def check_before_submitting(self, state: BalanceState) -> None:
        """Prompts against the model's classes, the classifier's classes against the dataset's, and the classifier
        on the user's own images (once per classifier: its outcome is kept in the state file for the resumes): a
        UserInputError (nothing submitted) for what would ruin the run."""
        self.say("checking prompts against the model")
        check_prompts_against_model(self.client.model_info(), self.dataset, self.console, self.options.force)
        spec = self._classifier_spec()
        if spec is None:
            return
        match = match_classes(spec, self.dataset.class_names)
        self.classifier_index = match.classifier_index
        if match.note:
            self.console.print(f"[yellow]note:[/] {match.note}", soft_wrap=True)
        if self.options.classifier is None:
            self.say("pre-flight skipped: it needs the archive (--classifier), not only --classifier-id")
            return
        key = f"preflight:{self._classifier_digest(with_stats=False)}"
        if recorded := state.meta(key):
            self.say(f"pre-flight done before for this classifier: {recorded}")
            return
        self.say(
            f"pre-flight: scoring the classifier on up to {PREFLIGHT_IMAGES_PER_CLASS} images per class "
            f"({PREFLIGHT_MAX_IMAGES:,} at most)"
        )
        result = run_preflight(self.options.classifier, spec, self.dataset, match)
        if result is None:
            self.console.print(
                "[yellow]warning:[/] pre-flight skipped: scoring the classifier on your images needs torch "
                "(pip install 'fgs[train]')",
                soft_wrap=True,
            )
        elif result.passed and result.well_fed:
            self.console.print(result.summary(), soft_wrap=True)
            state.set_meta(key, result.summary())
        elif result.passed:  # above the threshold yet below what a well-fed classifier scores: said loudly
            self.console.print(f"[bold red]WARNING:[/] {result.warning()}", soft_wrap=True, highlight=False)
            state.set_meta(key, f"{result.summary()}; below {WELL_FED_ACCURACY:.0%}, warned")
        elif self.options.force:
            self.console.print(
                f"[yellow]warning:[/] {result.refusal()} — running anyway (--force)", soft_wrap=True, highlight=False
            )
            state.set_meta(key, f"{result.summary()}; run anyway (--force)")
        else:
            raise UserInputError(result.refusal())

    def _classifier_spec(self) -> ClassifierSpec | None:
        if self.options.classifier_spec is not None:
            return read_classifier_spec(self.options.classifier_spec)
        if self.options.classifier_id is not None:
            return self.client.classifier(self.options.classifier_id).spec
        return None

    def resolve_classifier(self, state: BalanceState) -> None:
        """The uploaded classifier's id: the one the state saved for this archive, else uploaded now."""
        options = self.options
        if options.classifier is None:
            return
        digest = self._classifier_digest(with_stats=True)
        known = state.meta(f"classifier:{digest}")
        if known:
            self.classifier_id = known
            return
        self.say(f"uploading the classifier {options.classifier.name} (the service checks it in a sandbox)")
        spec = read_classifier_spec(options.classifier_spec)
        uploaded = self.client.upload_classifier(options.classifier, spec, options.hardness_stats)
        state.set_meta(f"classifier:{digest}", uploaded.classifier_id)
        self.classifier_id = uploaded.classifier_id

    def _classifier_digest(self, with_stats: bool) -> str:
        """sha256 of the classifier archive and spec (and its hardness statistics): what the state keys it by."""
        options = self.options
        digest = hashlib.sha256(options.classifier.read_bytes() + options.classifier_spec.read_bytes())
        if with_stats and options.hardness_stats:  # can be several GB (ImageNet-LT at k = 2,048: 0.95 GB): in chunks
            with open(options.hardness_stats, "rb") as stats:
                while chunk := stats.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def image_id(self, state: BalanceState, image: RealImage) -> str | None:
        """Upload one conditioning image unless its sha256 is known; None when the file does not decode."""
        if image.path not in self._image_ids:
            self._image_ids[image.path] = self._upload_image(state, image)
        return self._image_ids[image.path]

    def _upload_image(self, state: BalanceState, image: RealImage) -> str | None:
        digest = self.digests[image.path]
        known = state.uploaded_id(digest)
        if known:
            return known
        data = image.path.read_bytes()
        try:
            with Image.open(BytesIO(data)) as decoded:
                decoded.load()
        except (OSError, ValueError):
            self.bad_conditioning.add(image.path)
            return None
        uploaded = self.client.upload_image(data, filename=image.path.name)
        state.record_upload(digest, uploaded.image_id)
        return uploaded.image_id

    def request(self, state: BalanceState, slot: JobSlot) -> GenerateRequest:
        ids = [self.image_id(state, image) for image in slot.conditioning]
        good = [i for i in ids if i is not None]
        # A pick that does not decode is replaced by the slot's first good pick (deterministic on rerun).
        ids = [i if i is not None else good[0] for i in ids] if good else []
        return GenerateRequest(
            prompt=slot.prompt,
            class_index=self.classifier_index[slot.entry.class_index],
            conditioning_image_ids=ids,
            num_images=slot.num_images,
            classifier_id=self.classifier_id,
            seed=slot.seed,
            group=slot.entry.group,
            **self.options.generation_fields(),
        )

    def submit_current(self, state: BalanceState, build, submit, first=None):
        """`submit(build())`, and once more after each 404 for a saved conditioning image or classifier id that the
        service no longer has (its tenant deleted it since this run's state saved it): those ids are forgotten and
        uploaded again, where a rerun would otherwise be refused the same way forever. Returns (request, answer)."""
        request = build() if first is None else first
        for _ in range(2):  # at most one forget of the classifier, one of images
            try:
                return request, submit(request)
            except ApiError as error:
                if not self._forget_missing(state, error):
                    raise
            request = build()
        return request, submit(request)

    def _forget_missing(self, state: BalanceState, error: ApiError) -> bool:
        """After a 404 naming an id this run saved: forget the ids the service lost; False for any other error."""
        missing = _MISSING_ID.search(error.message) if error.status == 404 else None
        if missing is None:
            return False
        kind, object_id = missing.groups()
        if kind == "classifier":
            if object_id != self.classifier_id:
                return False
            if self.options.classifier is None:
                raise UserInputError(
                    f"the classifier {object_id} (--classifier-id) is no longer on the service (deleted?): upload it "
                    "again, or give --classifier and --classifier-spec"
                ) from error
            self.say(f"the classifier {object_id} is no longer on the service: uploading it again")
            state.forget_meta_value(object_id)
            self.classifier_id = None
            self.resolve_classifier(state)
            return True
        present = {image.image_id for image in self.client.images()}
        forgotten = state.forget_uploads_except(present)
        self._image_ids = {path: i for path, i in self._image_ids.items() if i is None or i in present}
        if forgotten:
            self.say(f"{forgotten} conditioning images are no longer on the service: uploading them again")
        return forgotten > 0


def check_prompts_against_model(
    info: ModelInfo | None, dataset: ScannedDataset, console: Console, force: bool = False
) -> None:
    """Refuse (a UserInputError) prompts that name no class the service's model was trained on (its model card,
    GET /v1/model): their images would follow the conditioning image alone, a whole run spent for nothing; with
    `force`, warn and go on. Note when prompts name its classes in another form than it was trained with. A model
    that publishes no class list (SD 2.1 unCLIP) knows any prompt."""
    if info is None or not info.class_names:
        return
    prompts = list(dict.fromkeys(dataset.prompt(c, g) for c, g in dataset.units()))
    unknown = info.unknown_prompt_classes(prompts)
    if unknown:
        message = (
            f"{len(unknown)} of the prompts name no class the model {info.model} was trained on (first: "
            f"{', '.join(repr(p) for p in unknown[:5])}). It knows {', '.join(info.class_names)}, prompted as "
            f"{info.prompt_template!r}: give --prompts FILE (class -> prompt) or --prompt-template, or images will "
            "follow the conditioning image alone"
        )
        if not force:
            raise UserInputError(f"{message}; --force generates them anyway")
        console.print(f"[yellow]warning:[/] {message}; generating anyway (--force)", soft_wrap=True)
        return
    if info.prompt_template:
        trained = {  # a card with contexts (fgs-digits-contexts) was trained on "{class_name} in {group}"
            info.prompt_template.format(class_name=name, group=context).lower()
            for name in info.class_names
            for context in info.contexts or [""]
        }
        other = [p for p in prompts if p.lower() not in trained]
        if other:
            console.print(
                f"[yellow]note:[/] {len(other)} prompts name the model's classes but not as it was trained "
                f"({info.prompt_template!r}; first: {', '.join(repr(p) for p in other[:3])}): "
                f"--prompt-template {info.prompt_template!r} prompts it as it learned",
                soft_wrap=True,
            )
