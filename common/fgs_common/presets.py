"""Named generation settings, each value with where it comes from: defined once, read by `fgs-client balance
--preset NAME` and by GET /v1/presets.

A preset sets some GenerationParams fields and a balance target; every field it does not set keeps the
GenerationParams default (whose own provenance is in common/fgs_common/wire/generation.py). Explicit flags
override a preset.
Sources are the paper (Askari-Hemmat et al., TMLR 2024; section or appendix), the released code
(github.com/facebookresearch/Feedback-guided-Data-Synthesis; file), or our own measurement (where it is recorded).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from fgs_common.wire import GenerationParams

RELEASED = "released code"


class PresetValue(BaseModel):
    value: Any
    source: str = Field(description="where the value comes from: a paper section, a released-code file, or our run")


class Preset(BaseModel):
    """A named setting: GenerationParams values, a balance target, and the source of each."""

    name: str
    description: str
    dataset: str | None = Field(None, description="the dataset layout the preset was made for")
    target: PresetValue = Field(description="images per class (or per class x group) after balancing")
    params: dict[str, PresetValue] = Field(description="GenerationParams fields the preset sets")
    notes: list[str] = Field(default_factory=list)

    def generation_params(self, overrides: dict[str, Any] | None = None) -> GenerationParams:
        """The preset's parameters, `overrides` (explicit flags or request fields) on top, the defaults below."""
        values = {name: item.value for name, item in self.params.items()}
        values.update(overrides or {})
        return GenerationParams(**values)


class PresetList(BaseModel):
    presets: list[Preset]


# Our Digits-LT validation choice (bench/digits_lt.json "selection"; tests/test_presets.py checks they agree).
DIGITS_VALIDATION = "our Digits-LT validation selection (bench/digits_lt.md, bench/digits_lt.json)"
# The best guided variant on Digits-LT validation: chosen 28 Nov 2026 (git show e35969a:bench/digits_lt.md), kept
# by the 6 Dec run at the preset's scale (bench/digits_lt.md), where it gained nothing over plain sampling.
DIGITS_CHOICE: dict[str, Any] = {
    "criterion": "entropy",
    "omega": 0.03,
    "gamma": 3.0,
    "dropout_p": 0.5,
    "dropout_scaling": "inverted",
    "feedback_input": "released",
}
# Values the validation run varied in one direction only, said per value (git show e35969a:bench/digits_lt.md).
DIGITS_NOT_SWEPT = {
    "gamma": "Digits-LT validation: γ 5 against 3 lost Few with plain (59.4 vs 63.2) and guided (61.2 vs 63.3) "
    "sampling, and more Fréchet distance (28 Nov 2026 run: git show e35969a:bench/digits_lt.md)",
    "dropout_scaling": "Digits-LT validation: without the 1/(1-p) rescaling Few fell from 63.2 to 49.6 ± 2.8 "
    "(plain, p 0.5; 28 Nov 2026 run: git show e35969a:bench/digits_lt.md)",
}

_PAPER_SAMPLING = {
    "criterion": PresetValue(
        value="entropy",
        source=f"{RELEASED} generate_csvs_offline.py (fg_criterion='entropy'); paper Fig. 5 and Table 1: entropy is "
        "the best criterion on ImageNet-LT and on NICO++ worst-group accuracy",
    ),
    "omega": PresetValue(
        value=0.03,
        source=f"{RELEASED} generate_csvs_offline.py (fg_scale=0.03, a step relative to the latents' norm as in "
        "fg_pipe.py cond_fn); the paper's text gives no value",
    ),
    "gamma": PresetValue(value=5.0, source=f"{RELEASED} generate_csvs_offline.py (cfg_scale=5); the paper gives none"),
    "steps": PresetValue(
        value=30,
        source=f"paper App. G and J ('30 steps of reverse diffusion'); {RELEASED} utils_gen.py "
        "(num_inference_steps=30)",
    ),
    "guidance_every": PresetValue(
        value=5, source=f"paper App. G and J ('every 5 steps'); {RELEASED} utils_gen.py (guidance_freq=5)"
    ),
    "feedback_input": PresetValue(
        value="released", source=f"{RELEASED} fg_pipe.py (cond_fn blends x0 and z_t; process_image stretches min-max)"
    ),
    "gradient_path": PresetValue(
        value="unet", source=f"{RELEASED} fg_pipe.py cond_fn (back-propagates through the UNet's conditional branch)"
    ),
    "feedback_resolution": PresetValue(
        value="full", source=f"{RELEASED} fg_pipe.py process_image (full-size decode; utils_gen.py only normalises)"
    ),
    "dropout_p": PresetValue(
        value=DIGITS_CHOICE["dropout_p"],
        source="not stated: the paper's final pipeline uses dropout (section 2.3, Table 2 rows 3-6) without a p, and "
        f"the released code conditions on text only; {DIGITS_VALIDATION}",
    ),
    "dropout_scaling": PresetValue(
        value=DIGITS_CHOICE["dropout_scaling"],
        source=f"not stated in the paper; not measured: {DIGITS_NOT_SWEPT['dropout_scaling']}",
    ),
}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="paper-imagenet-lt",
            description="the paper's ImageNet-LT pipeline: entropy feedback, every class to 1,300 images",
            dataset="imagenet-lt",
            target=PresetValue(
                value=1300,
                source=f"paper App. J.1 ('1,300 examples per class'); {RELEASED} generate_csvs_offline.py "
                "(max_count=1300)",
            ),
            params=_PAPER_SAMPLING,
            notes=["The paper samples in float16 (App. G); fgs samples in the worker's dtype."],
        ),
        Preset(
            name="paper-nicopp",
            description="the paper's NICO++ setting: every class x context group to 811 images",
            dataset="nico++",
            target=PresetValue(
                value=811,
                source="paper section 3 ('each group has 811 samples', the largest group) and App. J.2",
            ),
            params=_PAPER_SAMPLING,
            notes=[
                "Groups without real images are conditioned on random images of the same class from other groups "
                "(paper App. J.2); `fgs-client balance` plans this by itself (conditioning 'other groups').",
                "Prompts are 'class in context' (paper App. J.2), as the NICO++ reader writes them.",
                "The sampling values are the released code's only setting (its ImageNet-LT script); the paper gives "
                "none for NICO++.",
            ],
        ),
        Preset(
            name="digits",
            description="fgs-digits on Digits-LT: the setting chosen on validation",
            dataset="digits-lt",
            target=PresetValue(value="max", source="bench/digits_lt.py: every class to the largest class (60)"),
            params={
                **{
                    name: PresetValue(value=value, source=DIGITS_NOT_SWEPT.get(name, DIGITS_VALIDATION))
                    for name, value in DIGITS_CHOICE.items()
                },
                "steps": _PAPER_SAMPLING["steps"],
                "guidance_every": _PAPER_SAMPLING["guidance_every"],
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a KeyError names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
