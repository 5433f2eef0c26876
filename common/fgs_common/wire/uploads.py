"""Uploads: what jobs refer to by id, a conditioning image (`image_id`) and the team's classifier
(`classifier_id`, with its `ClassifierSpec`)."""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ImageUploaded(BaseModel):
    """An uploaded conditioning image: its content id, size, name and upload time."""

    image_id: str = Field(description="the image's id (sha256 of its bytes): what conditioning_image_ids take")
    width: int = Field(description="width in pixels")
    height: int = Field(description="height in pixels")
    name: str = Field("", description="the file name it was uploaded with")
    created_at: datetime | None = Field(None, description="when it was first uploaded")


class ClassifierOutput(str, Enum):
    """What the archive's forward returns."""

    logits = "logits"
    logits_embedding = "logits_embedding"  # a tuple (logits, embedding): the embedding feeds the hardness score


# A digits classifier's spec, as /docs shows it (fgs-digits' ten classes, 32 x 32 grey input).
CLASSIFIER_SPEC_EXAMPLE = {
    "num_classes": 10,
    "class_names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "input_size": 32,
    "in_channels": 1,
    "mean": [0.5],
    "std": [0.5],
    "output": "logits",
}


class ClassifierSpec(BaseModel):
    """The JSON that travels with an uploaded classifier archive."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CLASSIFIER_SPEC_EXAMPLE]})

    num_classes: Annotated[int, Field(ge=2, le=100_000, description="number of classes (logits)")]
    class_names: list[str] | None = Field(None, description="a name per class, in index order")
    input_size: Annotated[int, Field(ge=8, le=1024, description="side of the square input in pixels")]
    in_channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB) input channels")
    mean: Annotated[list[float], Field(min_length=1, max_length=3, description="mean per channel")] = [0.5, 0.5, 0.5]
    std: Annotated[list[float], Field(min_length=1, max_length=3, description="std per channel")] = [0.5, 0.5, 0.5]
    output: ClassifierOutput = Field(ClassifierOutput.logits, description="what the forward returns")

    @model_validator(mode="after")
    def _check(self) -> ClassifierSpec:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} must have 1 or in_channels={self.in_channels} values")
        if any(s <= 0 or not math.isfinite(s) for s in self.std):
            raise ValueError("std values must be positive and finite")
        return self


class ClassifierUploaded(BaseModel):
    """An uploaded classifier: its id, name, upload time and spec."""

    classifier_id: str = Field(
        description="the classifier's id (digest of archive, spec and statistics): what classifier_id takes"
    )
    name: str = Field("", description="the name it was uploaded with (default: the archive's file name)")
    created_at: datetime | None = Field(None, description="when it was first uploaded")
    spec: ClassifierSpec = Field(description="the spec it was uploaded with")
    has_hardness_stats: bool = Field(description="whether hardness statistics came with it")
