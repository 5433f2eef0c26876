"""How a balance run generates (`BalanceOptions`), and the check of those options before any scan or upload."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from fgs_client.generation_options import validation_message
from fgs_common.exceptions import UserInputError
from fgs_common.wire import Criterion, GenerateRequest, GenerationParams


@dataclass
class BalanceOptions:
    generation: GenerationParams = field(default_factory=GenerationParams)  # how every image is sampled
    text_only: bool = False  # condition on the prompt alone, never on a real image (the paper's "text only" ablation)
    images_per_job: int = 8
    seed: int = 0
    max_retries: int = 3
    classifier_id: str | None = None
    classifier: Path | None = None
    classifier_spec: Path | None = None
    hardness_stats: Path | None = None
    real_files: str = "link"
    chunk_size: int = 500
    poll_s: float = 0.5
    window: int = 64
    show_progress: bool = True
    force: bool = False  # submit even when the pre-flight refuses (unknown prompts, the classifier's score)

    def generation_fields(self) -> dict:
        """The generation parameters as JSON values (what the plan fingerprint and each request carry)."""
        return self.generation.model_dump(mode="json")


def check_balance_options(options: BalanceOptions) -> None:
    """Reject generation settings the service would refuse, before any scan, upload or file write."""
    for name in ("classifier", "classifier_spec", "hardness_stats"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_file():
            raise UserInputError(f"--{name.replace('_', '-')} {path} does not exist")
    if options.classifier is not None and options.classifier_spec is None:
        raise UserInputError(
            "--classifier needs --classifier-spec (the JSON spec: num_classes, input_size, mean, std, output)"
        )
    has_classifier = options.classifier is not None or options.classifier_id is not None
    criterion = options.generation.criterion
    if criterion is not Criterion.none and not has_classifier:
        raise UserInputError(
            f"--criterion {criterion.value} scores images with your classifier: give --classifier FILE with "
            "--classifier-spec SPEC.json (or --classifier-id of one uploaded before), or run without feedback "
            "(--criterion none --omega 0)"
        )
    try:
        GenerateRequest(
            prompt="check",
            class_index=0,
            classifier_id="check" if has_classifier else None,
            **options.generation_fields(),
        )
    except ValidationError as error:
        raise UserInputError(validation_message(error)) from None
