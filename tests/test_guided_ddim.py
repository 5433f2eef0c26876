"""The feedback-guided DDIM sampler on the tiny unCLIP pipeline, saved to disk and reloaded (issue 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableUnCLIPImg2ImgPipeline
from pydantic import ValidationError

from fgs_classifier.hardness_stats import HardnessStats
from fgs_classifier.registry import load_classifier
from fgs_classifier.small_cnn import SmallCNN, export_classifier
from fgs_common.exceptions import InvalidJob
from fgs_common.wire import (
    ClassifierOutput,
    ClassifierSpec,
    Criterion,
    DropoutScaling,
    FeedbackInput,
    FeedbackResolution,
    GenerationParams,
    GradientPath,
)
from fgs_worker.guidance.guided_ddim import (
    GuidedDDIMSampler,
    dropped_embeddings,
    min_max_stretch,
    released_feedback_latents,
)
from fgs_worker.model_loading import load_pipeline
from fgs_worker.tiny_model import TinyConfig, save_tiny_model

pytestmark = pytest.mark.model  # the diffusion model in process: minutes of CPU, so not in --fast
PROMPT = "a handwritten digit seven"


def random_images(n: int, seed: int = 0, size: int = 32) -> list[PIL.Image.Image]:
    rng = np.random.RandomState(seed)
    return [PIL.Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """SD 2.1 unCLIP predicts v; the tiny model does too."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-v"), TinyConfig(prediction_type="v_prediction"))


@pytest.fixture(scope="module")
def epsilon_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-eps"), TinyConfig(prediction_type="epsilon"))


@pytest.fixture(scope="module")
def sampler(model_dir) -> GuidedDDIMSampler:
    return GuidedDDIMSampler(load_pipeline(str(model_dir), device="cpu"))


def make_classifier(directory: Path, input_size: int = 32, sharpen: float = 30.0, seed: int = 0):
    """A random SmallCNN whose head is scaled up so its predictions are confident (entropy well below log K)."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, width=8, embedding_dim=16)
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    spec = ClassifierSpec(num_classes=10, input_size=input_size, output=ClassifierOutput.logits_embedding)
    archive, _ = export_classifier(model, directory, spec)
    return archive, spec, model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, sampler):
    directory = tmp_path_factory.mktemp("classifier")
    archive, spec, model = make_classifier(directory)
    # Hardness statistics from the classifier's embeddings of random images, 30 per class label.
    pixels = torch.rand(300, 3, 32, 32)
    with torch.no_grad():
        _, embeddings = model.eval()((pixels - 0.5) / 0.5)
    stats = HardnessStats.fit(embeddings, torch.arange(300) % 10, num_classes=10)
    stats_path = directory / "stats.safetensors"
    stats.save(stats_path)
    return load_classifier(archive, spec, stats_path)


def run(sampler, **kwargs):
    """The sampler with GenerationParams fields given as keywords beside its other arguments."""
    arguments = dict(prompt=PROMPT, class_index=7, steps=10, guidance_every=2, gamma=3.0)
    arguments.update(kwargs)
    params = GenerationParams(**{k: arguments.pop(k) for k in list(arguments) if k in GenerationParams.model_fields})
    return sampler(params=params, **arguments)


def diffusers_reference(sampler, images, seeds, steps=10, **kwargs) -> np.ndarray:
    pipe: StableUnCLIPImg2ImgPipeline = sampler.pipeline
    return pipe(
        prompt=[PROMPT] * len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=steps,
        guidance_scale=3.0,
        output_type="np",
        **({"image": images} if images is not None else {}),
        **kwargs,
    ).images


@pytest.mark.parametrize("batch", [1, 4])
def test_unguided_output_equals_diffusers_pipeline(sampler, batch):
    assert_equals_diffusers(sampler, batch)


def test_epsilon_prediction_model_also_equals_diffusers(epsilon_model_dir):
    sampler = GuidedDDIMSampler(load_pipeline(str(epsilon_model_dir), device="cpu"))
    assert sampler.pipeline.scheduler.config.prediction_type == "epsilon"
    assert_equals_diffusers(sampler, 2)


def assert_equals_diffusers(sampler, batch):
    images, seeds = random_images(batch), [11 + i for i in range(batch)]
    ours = run(sampler, conditioning_images=images, seeds=seeds).pixels.permute(0, 2, 3, 1).numpy()
    reference = diffusers_reference(sampler, images, seeds)
    assert ours.shape == reference.shape == (batch, 32, 32, 3)
    assert np.abs(ours - reference).max() <= 1e-4


def test_dropout_one_reproduces_text_only_conditioning(sampler):
    seeds = [3, 4]
    dropped = run(sampler, conditioning_images=random_images(1), seeds=seeds, dropout_p=1.0).pixels
    text_only = run(sampler, conditioning_images=[], seeds=seeds).pixels
    reference = diffusers_reference(sampler, None, seeds, image_embeds=torch.zeros(2, 32))
    assert torch.equal(dropped, text_only)
    assert np.abs(text_only.permute(0, 2, 3, 1).numpy() - reference).max() <= 1e-4


def test_pixel_diversity_across_seeds_grows_with_dropout(sampler):
    image = random_images(1, seed=5)
    seeds = list(range(8))

    def diversity(p: float) -> float:
        pixels = run(sampler, conditioning_images=image, seeds=seeds, dropout_p=p).pixels.flatten(1)
        return torch.pdist(pixels).mean().item()

    values = [diversity(p) for p in (0.0, 0.5, 0.9)]
    assert values[0] < values[1] < values[2], values


@pytest.fixture(scope="module")
def sampler_float64(model_dir) -> GuidedDDIMSampler:
    """The same model in float64. Feedback amplifies rounding: in float32 on an AMD EPYC (AVX2, 2026-12-06) one of
    the four images below came out 6.4e-3 away from its single call at ω 0.2 through the U-Net (the other three
    within 2e-5; the machines of earlier sessions kept all four within 1e-4): the batched convolutions round
    differently (1.5e-6 apart without feedback) and ω·∇C blows that up for one image. In float64 all four are within
    3e-6 (the classifier stays in float32), so the test holds them to 1e-5: a real mixing of the batch's rows
    still shows, rounding does not."""
    return GuidedDDIMSampler(load_pipeline(str(model_dir), device="cpu", dtype=torch.float64))


@pytest.mark.parametrize("path", list(GradientPath))
def test_batch_of_four_equals_four_single_calls_with_feedback(sampler_float64, classifier, path):
    images, seeds = random_images(4, seed=2), [21, 22, 23, 24]
    common = dict(criterion="entropy", omega=0.2, classifier=classifier, dropout_p=0.3, gradient_path=path)
    batch = run(sampler_float64, conditioning_images=images, seeds=seeds, **common)
    for i, seed in enumerate(seeds):
        single = run(sampler_float64, conditioning_images=[images[i]], seeds=[seed], **common)
        assert (single.pixels[0] - batch.pixels[i]).abs().max().item() <= 1e-5
        assert single.criterion_values[0] == pytest.approx(batch.criterion_values[i], abs=1e-4)


@pytest.mark.parametrize("criterion", [Criterion.loss, Criterion.entropy, Criterion.hardness])
@pytest.mark.parametrize(
    "path, resolution",
    [(GradientPath.unet, FeedbackResolution.full), (GradientPath.constant_eps, FeedbackResolution.classifier)],
)
def test_feedback_raises_the_mean_final_criterion(sampler, classifier, criterion, path, resolution):
    images, seeds = random_images(1, seed=7), list(range(100, 108))
    common = {
        "conditioning_images": images,
        "seeds": seeds,
        "criterion": criterion,
        "classifier": classifier,
        "gradient_path": path,
        "feedback_resolution": resolution,
    }
    plain = run(sampler, omega=0.0, **common)
    guided = run(sampler, omega=0.5, **common)
    assert len(guided.criterion_values) == 8 and len(guided.probabilities[0]) == 10
    assert np.mean(guided.criterion_values) > np.mean(plain.criterion_values) + 1e-3


def test_feedback_resolution_decodes_at_the_classifier_size(sampler, tmp_path):
    archive, spec, _ = make_classifier(tmp_path, input_size=16)
    small = load_classifier(archive, spec)
    latents = torch.randn(2, 4, 8, 8)
    full = sampler.decode_for_classifier(latents, small, FeedbackResolution.full)
    reduced = sampler.decode_for_classifier(latents, small, FeedbackResolution.classifier)
    assert full.shape[-2:] == (32, 32) and reduced.shape[-2:] == (16, 16)
    guided = run(
        sampler,
        conditioning_images=random_images(1),
        seeds=[1, 2],
        criterion="entropy",
        omega=0.3,
        classifier=small,
        feedback_resolution="classifier",
    )
    assert len(guided.images) == 2 and guided.images[0].size == (32, 32)


@pytest.mark.parametrize(
    "prediction, path",
    [("v", GradientPath.unet), ("v", GradientPath.constant_eps), ("epsilon", GradientPath.unet)],
)
def test_criterion_gradient_matches_finite_differences_in_float64(
    model_dir, epsilon_model_dir, tmp_path, prediction, path
):
    directory = model_dir if prediction == "v" else epsilon_model_dir
    pipe = load_pipeline(str(directory), device="cpu", dtype=torch.float64)
    sampler = GuidedDDIMSampler(pipe)
    archive, spec, _ = make_classifier(tmp_path, sharpen=3.0)
    clf = load_classifier(archive, spec, dtype=torch.float64)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    alpha_t = scheduler.alphas_cumprod[t].to(torch.float64)
    generators = [torch.Generator().manual_seed(0)]
    prompt_embeds, _ = pipe.encode_prompt(
        prompt=[PROMPT], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    image_embeds = sampler._image_embeddings(random_images(1), [0], [GenerationParams()], generators)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guided_output = torch.randn_like(z0)
    kwargs = {
        "t": t,
        "alpha_t": alpha_t,
        "scheduler": scheduler,
        "guided_output": guided_output,
        "cond_prompt_embeds": prompt_embeds,
        "cond_image_embeds": image_embeds,
        "classifier": clf,
        "criterion": Criterion.entropy,
        "labels": torch.tensor([7]),
        "gradient_path": path,
        "resolution": FeedbackResolution.full,
    }

    def criterion_at(z):
        return sampler.feedback_criterion(z, **kwargs).sum()

    z = z0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(criterion_at(z), z)
    directions = torch.randn(24, *z0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        if path is GradientPath.constant_eps:
            # Hold eps_hat at its value for z0, exactly as the constant path differentiates.
            eps0 = sampler._predicted_noise(scheduler, guided_output, z0, alpha_t)
            kwargs["guided_output"] = None

            def criterion_at(z):  # noqa: F811
                x0 = (z - (1 - alpha_t).sqrt() * eps0) / alpha_t.sqrt()
                logits, _ = clf(sampler.decode_for_classifier(x0, clf, FeedbackResolution.full))
                from fgs_worker.guidance.criteria import entropy

                return entropy(logits).sum()

        finite = torch.stack([(criterion_at(z0 + h * d) - criterion_at(z0 - h * d)) / (2 * h) for d in directions])
    analytic = (directions * grad).flatten(1).sum(1)
    cosine = torch.nn.functional.cosine_similarity(finite, analytic, dim=0).item()
    assert cosine >= 0.99, cosine
    assert grad.abs().sum() > 0


def test_gradient_paths_differ(sampler, classifier):
    common = dict(
        conditioning_images=random_images(1), seeds=[5], criterion="entropy", omega=0.5, classifier=classifier
    )
    through_unet = run(sampler, gradient_path="unet", **common).pixels
    constant = run(sampler, gradient_path="constant_eps", **common).pixels
    assert (through_unet - constant).abs().max() > 1e-3


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(criterion="sharpness"), "criterion"),
        (dict(omega=float("nan"), criterion="entropy"), "omega"),
        (dict(omega=float("inf"), criterion="entropy"), "omega"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(steps=3, guidance_every=5), "guidance_every"),
        (dict(steps=1000), "steps"),
        (dict(conditioning_images=random_images(2), seeds=[1, 2, 3]), "conditioning_images"),
        (dict(criterion="hardness", omega=0.1, use_stats=False), "hardness"),
        (dict(criterion="entropy", omega=0.1, class_index=12), "class_index"),
        (dict(criterion="entropy", omega=0.1, no_classifier=True), "classifier"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(noise_level=1000), "noise_level"),
        (dict(width=30), "width"),
    ],
)
def test_bad_arguments_raise_a_clear_error(sampler, classifier, tmp_path, arguments, named):
    arguments = dict(arguments)
    clf = classifier
    if arguments.pop("use_stats", True) is False:
        archive, spec, _ = make_classifier(tmp_path)
        clf = load_classifier(archive, spec)
    if arguments.pop("no_classifier", False):
        clf = None
    arguments.setdefault("seeds", [1])
    with pytest.raises((InvalidJob, ValidationError), match=named):  # the sampler's check, or GenerationParams'
        run(sampler, classifier=clf, **arguments)


def test_classifier_with_wrong_number_of_classes_is_refused(tmp_path):
    from fgs_common.exceptions import InvalidClassifier

    archive, _, _ = make_classifier(tmp_path)
    wrong = ClassifierSpec(num_classes=7, input_size=32, output=ClassifierOutput.logits_embedding)
    with pytest.raises(InvalidClassifier, match="num_classes"):
        load_classifier(archive, wrong)


def test_a_pickle_is_never_loaded_as_a_classifier(tmp_path):
    from fgs_common.exceptions import InvalidClassifier

    path = tmp_path / "model.pt"
    torch.save(SmallCNN(10).state_dict(), path)
    spec = ClassifierSpec(num_classes=10, input_size=32)
    with pytest.raises(InvalidClassifier, match="pickle"):
        load_classifier(path, spec)


def released_reference(x0_hat: np.ndarray, z_t: np.ndarray, alpha_t: float) -> np.ndarray:
    """The released code's feedback latents written out image by image, element by element (fg_pipe.py cond_fn)."""
    out = np.empty_like(x0_hat)
    f = (1.0 - alpha_t) ** 0.5
    for index in np.ndindex(*x0_hat.shape):
        out[index] = x0_hat[index] * f + z_t[index] * (1.0 - f)
    return out


def stretch_reference(pixels: np.ndarray) -> np.ndarray:
    """fg_pipe.py process_image after the decode, one image at a time: minus its min, over its new max."""
    out = np.empty_like(pixels)
    for b in range(pixels.shape[0]):
        shifted = pixels[b] - pixels[b].min()
        out[b] = shifted / shifted.max()
    return out


def test_released_feedback_input_equals_a_hand_written_reference():
    rng = np.random.default_rng(0)
    x0_hat, z_t = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))
    for alpha_t in (0.02, 0.5, 0.97):
        alpha = torch.tensor(alpha_t, dtype=torch.float64)
        blended = released_feedback_latents(torch.from_numpy(x0_hat), torch.from_numpy(z_t), alpha)
        np.testing.assert_allclose(blended.numpy(), released_reference(x0_hat, z_t, alpha_t), rtol=1e-12)
    pixels = rng.normal(size=(2, 3, 4, 4)) * np.array([1.0, 5.0])[:, None, None, None]
    stretched = min_max_stretch(torch.from_numpy(pixels))
    np.testing.assert_allclose(stretched.numpy(), stretch_reference(pixels), rtol=1e-12)
    assert stretched.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0] and stretched.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]


def test_released_feedback_input_is_what_the_sampler_scores(model_dir, tmp_path):
    """feedback_criterion with feedback_input 'released' = the classifier on the stretched decode of the blend."""
    pipe = load_pipeline(str(model_dir), device="cpu", dtype=torch.float64)
    sampler = GuidedDDIMSampler(pipe)
    archive, spec, _ = make_classifier(tmp_path, sharpen=3.0)
    clf = load_classifier(archive, spec, dtype=torch.float64)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[2]
    alpha_t = scheduler.alphas_cumprod[t].to(torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guided_output = torch.randn_like(z)
    kwargs = {
        "t": t,
        "alpha_t": alpha_t,
        "scheduler": scheduler,
        "guided_output": guided_output,
        "cond_prompt_embeds": None,
        "cond_image_embeds": None,
        "classifier": clf,
        "criterion": Criterion.entropy,
        "labels": torch.tensor([7, 7]),
        "gradient_path": GradientPath.constant_eps,
        "resolution": FeedbackResolution.full,
    }
    released = sampler.feedback_criterion(z, feedback_input=FeedbackInput.released, **kwargs)
    x0 = sampler.feedback_criterion(z, feedback_input=FeedbackInput.x0, **kwargs)
    eps = sampler._predicted_noise(scheduler, guided_output, z, alpha_t)
    x0_hat = ((z - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()).numpy()
    latents = torch.from_numpy(released_reference(x0_hat, z.numpy(), float(alpha_t)))
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5
    logits, _ = clf(torch.from_numpy(stretch_reference(decoded.detach().numpy())))
    from fgs_worker.guidance.criteria import entropy

    torch.testing.assert_close(released, entropy(logits), rtol=1e-9, atol=1e-12)
    assert (released - x0).abs().max() > 1e-6


def test_dropout_scaling_zero_only_drops_units():
    embeds = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    inverted = dropped_embeddings(embeds, [1, 2, 3], 0.25, DropoutScaling.inverted)
    zeroed = dropped_embeddings(embeds, [1, 2, 3], 0.25, DropoutScaling.zero)
    kept = zeroed != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(zeroed[kept], embeds[kept])  # kept units untouched
    torch.testing.assert_close(inverted, zeroed / 0.75)  # same mask, rescaled by 1 / (1 - p)
    for scaling in DropoutScaling:
        torch.testing.assert_close(dropped_embeddings(embeds, [1, 2, 3], 0.0, scaling), embeds)


def test_released_feedback_input_and_zero_scaling_change_the_sampled_images(sampler, classifier):
    common = dict(
        conditioning_images=random_images(1), seeds=[5], criterion="entropy", omega=0.5, classifier=classifier
    )
    x0 = run(sampler, feedback_input="x0", **common).pixels
    released = run(sampler, feedback_input="released", **common).pixels
    assert (x0 - released).abs().max() > 1e-3
    inverted = run(sampler, dropout_p=0.5, dropout_scaling="inverted", **common).pixels
    zeroed = run(sampler, dropout_p=0.5, dropout_scaling="zero", **common).pixels
    assert (inverted - zeroed).abs().max() > 1e-3


@pytest.mark.parametrize("path", list(GradientPath))
def test_images_of_several_jobs_in_one_call_equal_each_job_alone(sampler, classifier, path):
    """The worker's shared batch (fgs_worker.shared_batch): per-image prompt, class, conditioning, seed, ω, γ and
    p in one call give each job's images as the job alone; a job dropped between steps leaves the others."""
    shared = dict(criterion="entropy", gradient_path=path, steps=6, guidance_every=2)
    images = random_images(3, seed=4)
    jobs = [  # (prompt, class, conditioning images, seeds, per-job parameters)
        ("a handwritten digit seven", 7, images[:1], [5], dict(omega=0.2, gamma=3.0, dropout_p=0.3)),
        ("a handwritten digit two", 2, [], [8, 9], dict(omega=0.5, gamma=2.0)),
        (
            "a photo of digit one",
            1,
            images[1:],
            [3, 4],
            dict(omega=0.1, gamma=4.0, dropout_p=0.5, dropout_scaling="zero"),
        ),
    ]
    alone = [
        sampler(
            prompt=prompt,
            class_index=label,
            conditioning_images=conditioning,
            seeds=seeds,
            params=GenerationParams(**shared, **own),
            classifier=classifier,
        )
        for prompt, label, conditioning, seeds, own in jobs
    ]
    rows = [(job, i) for job, (*_, seeds, _) in enumerate(jobs) for i in range(len(seeds))]

    def row_image(job: int, i: int):
        conditioning = jobs[job][2]
        return conditioning[i] if len(conditioning) > 1 else (conditioning[0] if conditioning else None)

    dropped = {row for row, (job, _) in enumerate(rows) if job == 1}
    together = sampler(
        prompt=[jobs[job][0] for job, _ in rows],
        class_index=[jobs[job][1] for job, _ in rows],
        conditioning_images=[row_image(job, i) for job, i in rows],
        seeds=[jobs[job][3][i] for job, i in rows],
        params=[GenerationParams(**shared, **jobs[job][4]) for job, _ in rows],
        classifier=classifier,
        on_step=lambda step, total: None if step < 3 else set(range(len(rows))) - dropped,
    )
    assert together.rows == [row for row in range(len(rows)) if row not in dropped]
    for position, row in enumerate(together.rows):
        job, i = rows[row]
        # As in-job batching: the batch size changes the CPU kernels' summation order, not the image; the 8-bit
        # image equals the job's own but for a pixel that lies within ~1e-6 of a rounding boundary.
        assert (together.pixels[position] - alone[job].pixels[i]).abs().max().item() <= 1e-4, (job, i)
        assert together.criterion_values[position] == pytest.approx(alone[job].criterion_values[i], abs=1e-4)
        eight_bit = np.asarray(together.images[position]).astype(int) - np.asarray(alone[job].images[i])
        assert np.abs(eight_bit).max() <= 1, (job, i)
