"""The guided loop in bfloat16 and float16 on the CPU (issue 15): every criterion, both gradient paths, both
feedback resolutions and both feedback inputs give finite images, and a feedback gradient that points where
float32's does at the same latents.

The tiny model (32 px, random weights; the three copies are the same weights, cast) and a float32 random
SmallCNN at 16 px, so that the feedback resolution 'classifier' decodes at half the image side.
"""

from __future__ import annotations

import PIL.Image
import pydantic
import pytest
import torch
import torch.nn.functional as F

from fgs_classifier.hardness_stats import HardnessStats
from fgs_classifier.registry import LoadedClassifier, load_classifier
from fgs_classifier.small_cnn import random_small_cnn
from fgs_common.settings import Settings
from fgs_common.wire import Criterion, FeedbackInput, FeedbackResolution, GenerationParams, GradientPath
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler, _Rows
from fgs_worker.model_loading import TINY_MODEL, load_pipeline, model_dtype
from fgs_worker.runtime import WorkerRuntime

pytestmark = pytest.mark.model  # the diffusion model in process: minutes of CPU, so not in --fast
PROMPT = "a handwritten digit seven"
REDUCED = [torch.bfloat16, torch.float16]
CRITERIA = [Criterion.loss, Criterion.entropy, Criterion.hardness]
# The two feedback settings the sampler offers beside each other: the paper's (decode x0_hat at full size) and the
# released code's (decode its blend of x0_hat and z_t, min-max stretched) at the classifier's size.
FEEDBACK = [
    (FeedbackResolution.full, FeedbackInput.x0),
    (FeedbackResolution.classifier, FeedbackInput.released),
]
SEEDS = [1, 2]
CLASS_INDEX = 7

# Bounds on the cosine between the 16-bit and the float32 feedback gradient at the same latents: the 6 guided
# steps of the default schedule (30 steps, feedback every 5th) along a float32 guided run, 2 images, so 12
# cosines per case. Measured on this test's 12 cases (28 Nov 2026, torch 2.13, Xeon with AMX-BF16):
#   bfloat16: mean per case 0.930-0.982, smallest single cosine 0.759 (first step, alpha_t = 0.0075)
#   float16:  mean per case 0.968-0.998, smallest single cosine 0.910
# With Eq. 11 computed in 16 bits instead (fgs_worker.guidance.precision undone) bfloat16 measured means
# 0.887-0.936 and single cosines down to 0.23 in 5 of the 12 cases: the bounds below fail that. Random directions
# in the 256-number latent have cosine 0 +- 0.06, and a cut graph (a detach, a cast outside autograd) gives 0 or
# NaN. On the trained fgs-digits model the same cases measured bfloat16 0.975-0.995 (smallest 0.917) and float16
# 0.939-0.999 (smallest 0.844). On an AMD EPYC with AVX-512 and no AMX (6 Dec 2026, the CI machine of that day)
# the 12 cases measured bfloat16 means from 0.911 (smallest 0.754) and float16 0.912-0.997 (smallest 0.832): other
# CPUs' 16-bit kernels differ, so the float16 mean bound is 0.90, not the 0.93 the Xeon alone allowed.
MEAN_COSINE_AT_LEAST = {torch.bfloat16: 0.88, torch.float16: 0.90}
MIN_COSINE_AT_LEAST = {torch.bfloat16: 0.6, torch.float16: 0.8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the 32 px model's ops are too small to share, and on a loaded machine the idle threads
    spin (a draft of this file took 350 s of CPU with 2 threads on a loaded 2-core machine, about 40 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samplers() -> dict[torch.dtype, GuidedDDIMSampler]:
    return {
        dtype: GuidedDDIMSampler(load_pipeline(TINY_MODEL, device="cpu", dtype=dtype))
        for dtype in (torch.float32, *REDUCED)
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> LoadedClassifier:
    """A float32 SmallCNN (as the team's archives are) with hardness statistics of random images' embeddings."""
    directory = tmp_path_factory.mktemp("classifier")
    archive, spec = random_small_cnn(directory, num_classes=10, input_size=16)
    plain = load_classifier(archive, spec)
    with torch.no_grad():
        _, embeddings = plain(torch.rand(300, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    HardnessStats.fit(embeddings, torch.arange(300) % 10, num_classes=10).save(directory / "stats.safetensors")
    return load_classifier(archive, spec, directory / "stats.safetensors")


def conditioning_image() -> PIL.Image.Image:
    pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(5))
    return PIL.Image.fromarray((pixels * 255).to(torch.uint8).numpy())


def guided_params(criterion: Criterion, path: GradientPath, resolution, feedback_input, **schedule) -> GenerationParams:
    """The service's defaults (30 steps, feedback every 5th, gamma 5) unless `schedule` says otherwise."""
    return GenerationParams(
        criterion=criterion,
        omega=0.3,
        **schedule,
        gradient_path=path,
        feedback_resolution=resolution,
        feedback_input=feedback_input,
    )


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("path", list(GradientPath), ids=str)
@pytest.mark.parametrize("criterion", CRITERIA, ids=str)
def test_guided_sampling_in_16_bits_gives_finite_images(samplers, classifier, dtype, criterion, path):
    sampler = samplers[dtype]
    assert sampler.dtype == dtype and classifier.dtype == torch.float32
    for resolution, feedback_input in FEEDBACK:
        output = sampler(
            prompt=PROMPT,
            class_index=CLASS_INDEX,
            conditioning_images=[conditioning_image()],
            seeds=SEEDS,
            params=guided_params(criterion, path, resolution, feedback_input, steps=2, guidance_every=1),
            classifier=classifier,
        )
        assert torch.isfinite(output.pixels).all() and output.pixels.std() > 0.01
        assert all(torch.isfinite(torch.tensor(output.criterion_values)))


class LoopInputs:
    """What the sampler's loop hands the UNet and `feedback_gradient` besides the latents, built as its steps 2-4
    build them, in the sampler's own dtype: CFG conditioning, the conditional branch alone, the labels and a
    scheduler."""

    def __init__(self, sampler: GuidedDDIMSampler, params: GenerationParams):
        pipe, batch = sampler.pipeline, len(SEEDS)
        generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        self.cond_prompt, negative = pipe.encode_prompt(
            prompt=[PROMPT] * batch, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        self.cond_image = sampler._image_embeddings([conditioning_image()], SEEDS, [params] * batch, generators)
        self.negative_prompt = negative
        self.scheduler = sampler.new_scheduler(params.steps)
        self.sampler, self.params = sampler, params

    def noise(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided UNet output (Eq. 12) at `latents` (float32, cast to the sampler's dtype here)."""
        sampler = self.sampler
        latents = latents.to(sampler.dtype)
        per_image = torch.full((len(SEEDS), 1, 1, 1), self.params.gamma, dtype=sampler.dtype)
        state = _Rows(
            rows=list(range(len(SEEDS))),
            latents=latents,
            cond_prompt=self.cond_prompt,
            uncond_prompt=self.negative_prompt,
            cond_image=self.cond_image,
            labels=torch.full((len(SEEDS),), CLASS_INDEX),
            gammas=per_image,
            omegas=torch.zeros_like(per_image),
        )
        return sampler._noise_prediction(state, t, self.scheduler)

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, classifier: LoadedClassifier) -> torch.Tensor:
        """The rescaled feedback gradient (Eq. 1's term) at `latents`, as float32."""
        params, latents = self.params, latents.to(self.sampler.dtype)
        return self.sampler.feedback_gradient(
            latents,
            t=t,
            alpha_t=self.scheduler.alphas_cumprod[t],  # float32, as the loop passes it
            scheduler=self.scheduler,
            guided_output=self.noise(latents, t),  # the constant_eps path's eps_hat
            cond_prompt_embeds=self.cond_prompt,
            cond_image_embeds=self.cond_image,
            classifier=classifier,
            criterion=params.criterion,
            labels=torch.full((len(SEEDS),), CLASS_INDEX),
            gradient_path=params.gradient_path,
            resolution=params.feedback_resolution,
            feedback_input=params.feedback_input,
        ).float()


def gradient_cosines(samplers, classifier, params: GenerationParams) -> dict[torch.dtype, torch.Tensor]:
    """Cosine [guided steps, B] of each 16-bit feedback gradient to float32's, at the latents of a float32 guided
    run (feedback every `guidance_every` steps, as the sampler applies it)."""
    inputs = {dtype: LoopInputs(sampler, params) for dtype, sampler in samplers.items()}
    reference = inputs[torch.float32]
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    config = reference.sampler.pipeline.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
    cosines: dict[torch.dtype, list[torch.Tensor]] = {dtype: [] for dtype in REDUCED}
    with torch.no_grad():
        for i, t in enumerate(reference.scheduler.timesteps):
            output = reference.noise(latents, t)
            if i % params.guidance_every == 0:
                gradient = reference.gradient(latents, t, classifier)
                for dtype in REDUCED:
                    reduced = inputs[dtype].gradient(latents, t, classifier)
                    cosines[dtype].append(F.cosine_similarity(reduced.flatten(1), gradient.flatten(1), dim=1))
                latents = latents + params.omega * gradient  # Eq. 1, applied before the DDIM step as the loop does
            latents = reference.scheduler.step(output, t, latents, eta=0.0, return_dict=False)[0]
    return {dtype: torch.stack(values) for dtype, values in cosines.items()}


@pytest.mark.parametrize("resolution, feedback_input", FEEDBACK, ids=lambda value: str(value))
@pytest.mark.parametrize("path", list(GradientPath), ids=str)
@pytest.mark.parametrize("criterion", CRITERIA, ids=str)
def test_feedback_gradient_in_16_bits_points_where_float32_does(
    samplers, classifier, criterion, path, resolution, feedback_input
):
    params = guided_params(criterion, path, resolution, feedback_input)
    cosines = gradient_cosines(samplers, classifier, params)
    for dtype, values in cosines.items():
        summary = f"{dtype}: mean {values.mean():.4f}, min {values.min():.4f}, per step {values.tolist()}"
        print(summary)
        assert values.mean() >= MEAN_COSINE_AT_LEAST[dtype], summary
        assert values.min() >= MIN_COSINE_AT_LEAST[dtype], summary


def test_fgs_dtype_sets_the_worker_models_dtype_on_any_device(redis_server, monkeypatch):
    monkeypatch.setenv("FGS_DTYPE", "bfloat16")
    runtime = WorkerRuntime.load(Settings(redis_url=redis_server, model=TINY_MODEL, device="cpu"), name="dtype")
    pipe = runtime.sampler.pipeline
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder)} == {torch.bfloat16}
    # auto keeps what the worker did before FGS_DTYPE: float16 on CUDA, float32 elsewhere
    assert model_dtype("auto", torch.device("cuda")) == torch.float16
    assert model_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        Settings(dtype="half")
