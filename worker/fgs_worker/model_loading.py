"""Load the unCLIP pipeline a worker keeps resident: the embedded model, the tiny one, or a user's SD 2.1 unCLIP.

All three go through the same call, `StableUnCLIPImg2ImgPipeline.from_pretrained(dir, local_files_only=True)`,
so the embedded model exercises exactly the code path of the real one. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import StableUnCLIPImg2ImgPipeline
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPImageProcessorPil
from transformers.utils import logging as transformers_logging

from fgs_common.atomic_files import atomic_directory

EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED_MODEL = "fgs-digits"
# Every model shipped under models/: fgs-digits, and fgs-digits-contexts (digits in NICO++'s six contexts).
EMBEDDED_MODEL_NAMES = (EMBEDDED_MODEL, "fgs-digits-contexts")
TINY_MODEL = "tiny"


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """The directory holding `model`: an embedded model's name (EMBEDDED_MODEL_NAMES), 'tiny' (random weights,
    built once) or a path."""
    if model == TINY_MODEL:
        from fgs_worker.tiny_model import save_tiny_model

        cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "fgs-models")
        target = cache_dir / "tiny"
        if not (target / "model_index.json").exists():
            # Concurrent workers never see a half-written model; one that loses the race keeps the winner's
            # copy, which is identical (fixed seed).
            with atomic_directory(target) as staging:
                save_tiny_model(staging)
        return target
    path = EMBEDDED_MODELS_DIR / model if model in EMBEDDED_MODEL_NAMES else Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model '{model}': {path} is not a diffusers pipeline directory (no model_index.json). "
            "Point --model / FGS_MODEL at a local copy of stable-diffusion-2-1-unclip, or use "
            f"{', '.join(repr(name) for name in EMBEDDED_MODEL_NAMES)} or 'tiny'."
        )
    return path


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MODEL_CARD_JSON = "model_card.json"


def read_model_card(model: str, cache_dir: Path | None = None) -> dict:
    """The machine-readable part of a model's card: `model_card.json` beside the weights (class_names,
    prompt_template, card: the human-readable card's file); {} when the model has none (SD 2.1 unCLIP, tiny)."""
    path = resolve_model_dir(model, cache_dir) / MODEL_CARD_JSON
    if not path.is_file():
        return {}
    card = json.loads(path.read_text(encoding="utf-8"))
    if card.get("card"):
        card["card"] = str(path.parent / card["card"])
    return card


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype FGS_DTYPE names (fgs_common.settings.Settings.dtype); 'auto' is float16 on CUDA (diffusers'
    recipe for SD 2.1 unCLIP) and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"dtype '{name}' is not one of auto, {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def load_pipeline(
    model: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> StableUnCLIPImg2ImgPipeline:
    """Load a StableUnCLIP img2img pipeline from a local directory, in `dtype` (default: `model_dtype('auto')`)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or model_dtype("auto", device)
    path = resolve_model_dir(model, cache_dir)
    # The image processor is the PIL one, named: without torchvision (never installed beside the pinned CPU torch)
    # transformers picks it anyway, after a warning at every worker start. Same config file, same pixels.
    diffusers_logging.disable_progress_bar()  # a worker's log is lines, not bars ("Loading weights: 36/36")
    transformers_logging.disable_progress_bar()
    processor = CLIPImageProcessorPil.from_pretrained(path / "feature_extractor", local_files_only=True)
    # low_cpu_mem_usage=False: what diffusers falls back to without accelerate, said so it does not warn at every start
    pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(
        path, dtype=dtype, local_files_only=True, feature_extractor=processor, low_cpu_mem_usage=False
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.image_encoder):
        component.requires_grad_(False)
        component.eval()
    return pipeline
