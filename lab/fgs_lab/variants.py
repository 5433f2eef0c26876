"""One way of generating in an experiment (bench/digits_lt.py, bench/nicopp_mini.py): every generation parameter
it varies, given explicitly, as `GenerationParams` for the sampler or as `fgs-client` flags for the stack."""

from __future__ import annotations

from dataclasses import dataclass

from fgs_common.wire import GenerationParams


@dataclass(frozen=True)
class Variant:
    """A named setting, every generation parameter the experiments vary. Defaults: γ 3 (the value every recorded
    experiment used; GenerationParams' own is 5), feedback input x0 (a variant that wants the released code's input
    says so), and `text_only` (no conditioning image at all: the prompt alone); the rest are GenerationParams'."""

    name: str
    label: str
    criterion: str = "none"
    omega: float = 0.0
    gamma: float = 3.0
    dropout_p: float = 0.0
    dropout_scaling: str = "inverted"
    feedback_input: str = "x0"
    gradient_path: str = "unet"
    text_only: bool = False

    @property
    def guided(self) -> bool:
        return self.criterion != "none"

    def params(self, steps: int, guidance_every: int) -> GenerationParams:
        """For the sampler, in-process."""
        return GenerationParams(
            criterion=self.criterion,
            omega=self.omega,
            gamma=self.gamma,
            dropout_p=self.dropout_p,
            dropout_scaling=self.dropout_scaling,
            feedback_input=self.feedback_input,
            gradient_path=self.gradient_path,
            steps=steps,
            guidance_every=guidance_every,
        )

    def args(self) -> tuple[str, ...]:
        """For `fgs-client balance` against a stack (conditioning images come from the plan, so no text_only)."""
        if self.text_only:
            raise ValueError(f"variant {self.name}: text-only generation has no fgs-client flag")
        settings = {
            "criterion": self.criterion,
            "omega": self.omega,
            "gamma": self.gamma,
            "dropout-p": self.dropout_p,
            "dropout-scaling": self.dropout_scaling,
            "feedback-input": self.feedback_input,
            "gradient-path": self.gradient_path,
            "feedback-resolution": "full",
        }
        return tuple(part for flag, value in settings.items() for part in (f"--{flag}", str(value)))
