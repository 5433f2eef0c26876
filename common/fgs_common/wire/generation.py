"""The generation request: the sampling parameters (`GenerationParams`), a job's request (`GenerateRequest`) and
what the workers' model takes (`ModelInfo`).

Every default of GenerationParams says where it comes from: the paper (Askari-Hemmat et al., TMLR 2024), its
released code (github.com/facebookresearch/Feedback-guided-Data-Synthesis), or our Digits-LT validation run
(bench/digits_lt.md). Named settings with a source per value: fgs_common.presets.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_IMAGES_PER_JOB = 256
# Bounds that keep every number the API accepts representable where it goes (torch int64, JSON, Redis scores).
# The largest class count of a dataset fgs serves today is ImageNet-21k's 21,841; a million leaves room.
MAX_CLASS_INDEX = 1_000_000
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
# A feedback or guidance scale above this only saturates the sampler (ω is relative to the latents' norm;
# the paper sweeps ω ≤ 0.1 and γ ≤ 10): far above any useful value, far below float overflow in the loop.
MAX_GUIDANCE_SCALE = 1000.0


class Criterion(str, Enum):
    """Feedback criterion C(x, y, f_phi) of Eq. 1 (paper section 2.1.1)."""

    none = "none"
    loss = "loss"  # Eq. 2: cross-entropy of class y
    entropy = "entropy"  # Eq. 4: entropy of the classifier's softmax
    hardness = "hardness"  # Eq. 5: Mahalanobis hardness score


class GradientPath(str, Enum):
    """How d C / d z_t is taken through the DDIM predicted x0."""

    unet = "unet"  # back-propagate through the UNet's noise prediction, as the paper's released code does
    constant_eps = "constant_eps"  # treat the noise prediction as constant: dx0/dz_t = 1/sqrt(alpha_t)


class FeedbackResolution(str, Enum):
    """At which size the VAE decodes the predicted x0 for the classifier."""

    # Decode at full size. The released code (fg_pipe.py, utils_gen.py) feeds that decode to its classifier
    # without resizing; here the classifier's own preprocessing resizes when its input size differs.
    full = "full"
    classifier = "classifier"  # resize the latents so the VAE decodes straight at the classifier's input size


class FeedbackInput(str, Enum):
    """Which image the classifier scores at a feedback step."""

    x0 = "x0"  # the DDIM predicted x0 (Eq. 11, first term), decoded, as the paper's section 2.1.2 describes
    # The released code (fg_pipe.py, cond_fn and process_image): decode x0_hat * f + z_t * (1 - f) with
    # f = sqrt(1 - alpha_t), then stretch each image to [0, 1] by its min and max (both held constant).
    released = "released"


class DropoutScaling(str, Enum):
    """How the image embedding's kept units are scaled after dropout (section 2.3 does not say)."""

    inverted = "inverted"  # multiply the kept units by 1 / (1 - p): the expected embedding is unchanged
    zero = "zero"  # only zero the dropped units, as torch's dropout without rescaling would


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


# Validation context for what was stored or reported, not newly asked for: rules added for new requests (ω > 0
# needs a criterion) are not applied to it, so jobs created before a rule existed stay readable.
STORED = {"stored": True}


class GenerationParams(BaseModel):
    """How each image is sampled: the parameters of feedback-guided DDIM, defined once.

    The sampler takes this model; `GenerateRequest` extends it; the client's options and CLI flags and the PNG
    metadata are derived from its fields. A new parameter is added here, in the sampler, and in a test.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    # Default none: feedback needs the team's classifier, which a first request may not have. With a criterion,
    # the released code's ω is 0.03 (generate_csvs_offline.py; preset paper-imagenet-lt).
    criterion: Criterion = Field(
        Criterion.none, description="feedback criterion C (paper section 2.1.1); 'none' samples without feedback"
    )
    omega: float = Field(
        0.0, ge=0.0, le=MAX_GUIDANCE_SCALE, description="feedback scale ω of Eq. 1 (relative to the latents' norm)"
    )
    # Released code, generate_csvs_offline.py (cfg_scale=5); the paper states no γ.
    gamma: float = Field(5.0, ge=0.0, le=MAX_GUIDANCE_SCALE, description="classifier-free guidance scale γ (Eq. 12)")
    # Our Digits-LT validation (bench/digits_lt.md): with plain sampling (the default criterion) p = 0.5 against 0
    # moved Few by +1.3 (63.2 ± 4.3 vs 61.9 ± 1.3, within noise) and cost Many 6.1 points (75.4 vs 81.5), so p = 0.
    # The paper's pipeline uses dropout without a value (section 2.3); the presets set p = 0.5, the best guided
    # variant's.
    dropout_p: float = Field(
        0.0, ge=0.0, le=1.0, description="dropout probability p on the image embedding (paper section 2.3)"
    )
    # Paper App. G / J and the released utils_gen.py: 30 DDIM steps, feedback every 5th step.
    steps: int = Field(30, ge=1, le=999, description="DDIM denoising steps")
    guidance_every: int = Field(5, ge=1, le=1000, description="apply the feedback every k-th denoising step")
    width: int | None = Field(
        None, ge=8, le=2048, multiple_of=8, description="image width in pixels (default: the model's native size)"
    )
    height: int | None = Field(
        None, ge=8, le=2048, multiple_of=8, description="image height in pixels (default: the model's native size)"
    )
    # diffusers' StableUnCLIPImg2ImgPipeline default (noise_level=0): the embedding of the real image as it is.
    noise_level: int = Field(0, ge=0, le=999, description="unCLIP noise augmentation of the image embedding")
    # Released fg_pipe.py cond_fn back-propagates through the UNet.
    gradient_path: GradientPath = Field(
        GradientPath.unet,
        description="how dC/dz_t is taken: through the UNet, or with the noise prediction held constant",
    )
    # Released fg_pipe.py process_image decodes at full size.
    feedback_resolution: FeedbackResolution = Field(
        FeedbackResolution.full,
        description="decode the predicted x0 at full size, or straight at the classifier's input size",
    )
    # The released code's (fg_pipe.py); on Digits-LT validation it gave 65.8 ± 3.6 Few against 63.3 ± 4.6 with x0 at
    # entropy ω 0.03 (bench/digits_lt.md): not beyond noise, but the one measurement and the released code agree.
    feedback_input: FeedbackInput = Field(
        FeedbackInput.released,
        description="the image the classifier scores: the predicted x0, or the released code's blend of x0 and z_t "
        "stretched to [0, 1]",
    )
    # Our Digits-LT validation (bench/digits_lt.md, plain, p 0.5): without the 1/(1-p) rescaling ('zero') Few fell
    # from 63.2 ± 4.3 to 49.6 ± 2.8 and the Fréchet distance rose from 55 to 80; inverted is also what the service
    # did before the option existed.
    dropout_scaling: DropoutScaling = Field(
        DropoutScaling.inverted,
        description="after dropout on the image embedding: rescale the kept units by 1/(1-p), or only zero the dropped",
    )

    @field_validator("omega", "gamma")
    @classmethod
    def _check_finite(cls, value: float, info) -> float:
        return _finite(info.field_name, value)

    @model_validator(mode="after")
    def _check_steps(self) -> GenerationParams:
        if self.steps < self.guidance_every:
            raise ValueError(f"steps ({self.steps}) must be at least guidance_every ({self.guidance_every})")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _check_omega_has_a_criterion(cls, data: Any, handler, info: ValidationInfo) -> GenerationParams:
        # ω scales the criterion's gradient: without a criterion there is none, and the run would be recorded as
        # guided while it was not. The converse (a criterion at ω = 0) is allowed: it scores without steering.
        # A rule for new requests only: a job stored before it existed is read back as it was (context STORED),
        # and an instance already built (a record put into a JobPublic, a response) is not checked again.
        already_built = isinstance(data, GenerationParams)
        params = handler(data)
        stored = bool(info.context and info.context.get("stored"))
        if not (already_built or stored) and params.criterion is Criterion.none and params.omega > 0:
            raise ValueError(
                f"omega {params.omega} needs a criterion (loss, entropy or hardness): with criterion 'none' nothing "
                "is steered; set a criterion or omega 0"
            )
        return params

    @property
    def scores_without_steering(self) -> bool:
        """A criterion at ω = 0: each image gets its criterion value, no image is steered (a control run)."""
        return self.criterion is not Criterion.none and self.omega == 0

    def generation_params(self) -> GenerationParams:
        """The generation parameters alone (a subclass such as GenerateRequest carries more)."""
        return GenerationParams.model_validate(
            self.model_dump(include=set(GenerationParams.model_fields)), context=STORED
        )

    def shared_batch_key(self) -> tuple:
        """What must be equal for two images to share one sampler call (fgs_worker.guidance.guided_ddim).

        One denoising loop runs one scheduler (steps), at one latent size, with feedback on the same steps, one
        gradient path, one feedback input and decode size, one criterion and one noise level for the whole batch;
        classifier-free guidance and the feedback either run for every image or for none (γ = 1 and ω = 0 skip a
        UNet pass). Everything else (prompt, class, conditioning image, seed, the value of ω and γ, p and its
        scaling) is per image.
        """
        return (
            self.steps,
            self.guidance_every,
            self.width,
            self.height,
            self.noise_level,
            self.criterion.value,
            self.gradient_path.value,
            self.feedback_resolution.value,
            self.feedback_input.value,
            self.gamma != 1.0,
            self.criterion is not Criterion.none and self.omega != 0,
        )


# What an image is of: a request's prompt and class, also shown beside each image of the gallery.
Prompt = Annotated[str, Field(min_length=1, max_length=1000, description="text prompt, usually the class name")]
ClassIndex = Annotated[
    int, Field(ge=0, le=MAX_CLASS_INDEX, description="the intended class y: the classifier's output index")
]


# What /docs shows for a request, and what works as pasted against `fgs up` (the embedded fgs-digits model: class 7
# is "seven", prompted as its card says): no ids, since uploads come first (the OpenAPI description's workflow).
GENERATE_EXAMPLE = {"prompt": "a handwritten digit seven", "class_index": 7, "num_images": 4, "seed": 0}


class GenerateRequest(GenerationParams):
    """Body of POST /v1/generate: N images of one class, optionally steered by the team's classifier."""

    model_config = ConfigDict(json_schema_extra={"examples": [GENERATE_EXAMPLE]})

    prompt: Prompt
    class_index: ClassIndex
    conditioning_image_ids: Annotated[
        list[str],
        Field(
            default_factory=list,
            max_length=MAX_IMAGES_PER_JOB,
            description="uploaded real images to condition on: none (text only), one for every image, or one each",
        ),
    ]
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES_PER_JOB, description="images to generate")] = 1
    classifier_id: str | None = Field(None, description="an uploaded classifier (needed by every criterion)")
    seed: Annotated[
        int, Field(ge=0, le=MAX_SEED, description="image i of the job uses seed + i; seed + num_images - 1 ≤ 2^63 - 1")
    ] = 0
    group: str | None = Field(
        None,
        max_length=200,
        description="the dataset group the job fills (a NICO++ context, a Waterbirds background): provenance in "
        "each PNG, and what the gallery filters by; generation ignores it",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> GenerateRequest:
        n_ids = len(self.conditioning_image_ids)
        if n_ids not in (0, 1, self.num_images):
            raise ValueError(
                f"conditioning_image_ids must hold one id (used for every image) or num_images={self.num_images} "
                f"ids, got {n_ids}"
            )
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed + num_images - 1 must be at most {MAX_SEED} (image i uses seed + i)")
        if self.criterion is not Criterion.none and self.classifier_id is None:
            raise ValueError(f"criterion '{self.criterion.value}' needs a classifier_id")
        return self

    def seeds(self) -> list[int]:
        """One seed per image: image i of a job uses seed + i, so a job is reproducible image by image."""
        return [self.seed + i for i in range(self.num_images)]

    def shared_batch_key(self, tenant: str = "") -> tuple:
        """GenerationParams' key plus the classifier: jobs share a batch only under one classifier, and a
        classifier id names an upload of one tenant."""
        classifier = (tenant, self.classifier_id) if self.classifier_id else None
        return (*super().shared_batch_key(), classifier)


class ModelInfo(BaseModel):
    """GET /v1/model: the model the workers keep resident, as they publish it."""

    model: str = Field(description="FGS_MODEL of the workers")
    native_width: int = Field(description="image width when a request gives none")
    native_height: int = Field(description="image height when a request gives none")
    max_pixels_per_image: int = Field(
        description="largest width*height one image may have: a bigger request is refused (422), since one "
        "denoising step of it could not finish on this model"
    )
    class_names: list[str] | None = Field(
        None, description="the classes the model was trained on, from its model card (null: not known)"
    )
    prompt_template: str | None = Field(
        None,
        description="the prompt form it was trained with, '{class_name}' standing for a class name (and '{group}' "
        "for a context, e.g. '{class_name} in {group}')",
    )
    contexts: list[str] | None = Field(
        None, description="the contexts ('{group}' of the prompt form) the model was trained on, from its model card"
    )
    model_card: str | None = Field(None, description="where the model card lies (a path in the worker image or URL)")

    def unknown_prompt_classes(self, prompts: list[str]) -> list[str]:
        """The prompts that name none of the model's classes (all of them are fine when the classes are unknown)."""
        if not self.class_names:
            return []
        # whole words only, so that "one" is not found in "phone"; a class name may be several words
        known = [re.compile(rf"\b{re.escape(name.lower())}\b") for name in self.class_names]
        return [p for p in prompts if not any(name.search(p.lower()) for name in known)]
