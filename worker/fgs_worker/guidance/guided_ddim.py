"""Feedback-guided DDIM sampling on a StableUnCLIP img2img pipeline.

Askari-Hemmat et al., "Feedback-guided Data Synthesis for Imbalanced Classification" (TMLR 2024). The score
this loop follows is Eq. 1 (derived in App. A.1):

    grad log p(x | h, y) = grad log p(x) + gamma * grad log p(y | x) + omega * grad C(x, y, f_phi)
                           \\_____ classifier-free guidance (Eq. 12) ____/   \\__ feedback (Eq. 2-6) __/

Notation (latent diffusion, section 2.1.2):
    z_t        latents at DDIM timestep t          alpha_t    the scheduler's cumulative alpha product
    eps_hat    predicted noise (from eps or v)     x0_hat     DDIM predicted x0 (Eq. 11, first term)
    C          criterion (criteria.py)             omega      feedback scale; gamma: CFG scale

Conditioning (section 2.2, 2.3): the class prompt, and the CLIP embedding of a real image of the class with
dropout p on the embedding, noise-augmented as unCLIP does. With omega = 0 and p = 0 this loop computes exactly
what diffusers' StableUnCLIPImg2ImgPipeline computes for the same components and seeds (tested).

Every image of a batch has its own seed, conditioning image and dropout mask; nothing in image i depends on
the other images, so a batch of B gives the same images as B single calls. One call can therefore carry the
images of several jobs (the worker's shared batch, fgs_worker.shared_batch): prompt, class, conditioning image,
seed, ω, γ and dropout p (with its scaling) are per image; what one loop cannot vary per image, the parameters
of GenerationParams.shared_batch_key (steps, size, feedback steps and gradient path, feedback input and
resolution, criterion, noise level, whether guidance and feedback run at all) and the classifier, must match.
The step callback may drop images between steps (a canceled job's), which leaves the others unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableUnCLIPImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor

from fgs_classifier.registry import LoadedClassifier
from fgs_common.exceptions import InvalidJob
from fgs_common.wire import Criterion, DropoutScaling, FeedbackInput, FeedbackResolution, GenerationParams, GradientPath
from fgs_worker.guidance.feedback_classifier import FeedbackClassifier, as_feedback_classifier
from fgs_worker.guidance.precision import at_least_float32, compute_dtype

# What the sampler takes as its classifier: the worker's confined one, or a LoadedClassifier run in process.
Classifier = FeedbackClassifier | LoadedClassifier

# on_step(step, steps_total) -> the indices (into seeds) of the images to go on with; None: all still wanted
StepCallback = Callable[[int, int], Collection[int] | None]


@dataclass
class SampleOutput:
    images: list[PIL.Image.Image]
    pixels: torch.Tensor  # [B, 3, H, W] float in [0, 1], before 8-bit rounding
    criterion_values: list[float] | None  # C of each final image under the classifier
    probabilities: list[list[float]] | None  # the classifier's softmax of each final image
    rows: list[int] = field(default_factory=list)  # which of the call's seeds each image is (dropped ones missing)


@dataclass
class _Rows:
    """The per-image state of the denoising loop, so that images can be dropped between steps."""

    rows: list[int]  # index into the call's seeds
    latents: torch.Tensor
    cond_prompt: torch.Tensor
    uncond_prompt: torch.Tensor | None  # None without classifier-free guidance
    cond_image: torch.Tensor
    labels: torch.Tensor
    gammas: torch.Tensor  # [B, 1, 1, 1]
    omegas: torch.Tensor  # [B, 1, 1, 1]

    def keep(self, wanted: Collection[int]) -> _Rows:
        at = [i for i, row in enumerate(self.rows) if row in wanted]
        index = torch.tensor(at, dtype=torch.long, device=self.latents.device)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index)

        return _Rows(
            [self.rows[i] for i in at],
            *(pick(t) for t in (self.latents, self.cond_prompt, self.uncond_prompt, self.cond_image)),
            *(pick(t) for t in (self.labels, self.gammas, self.omegas)),
        )

    def unet_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_t, prompt and image embeddings as the UNet takes them: [uncond; cond] under guidance (Eq. 12)."""
        if self.uncond_prompt is None:
            return self.latents, self.cond_prompt, self.cond_image
        return (
            torch.cat([self.latents] * 2),
            torch.cat([self.uncond_prompt, self.cond_prompt]),
            torch.cat([torch.zeros_like(self.cond_image), self.cond_image]),
        )


def per_image(value, batch: int, name: str) -> list:
    """`value` once per image: a single value repeated, or a sequence of exactly `batch` values."""
    if isinstance(value, (str, int, GenerationParams)):
        return [value] * batch
    values = list(value)
    if len(values) != batch:
        raise InvalidJob(f"{name} must be one value or one per seed ({batch}), got {len(values)}")
    return values


def _dropout_generator(seed: int) -> torch.Generator:
    """A generator for image i's dropout mask, independent of its noise stream (a different, fixed seed)."""
    return torch.Generator().manual_seed((seed * 6364136223846793005 + 1442695040888963407) % 2**63)


def rescaled_criterion_gradient(
    latents: torch.Tensor, criterion_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """grad_z sum_b C_b(z) for a batch of independent samples, each rescaled to its own latents' norm.

    As in the paper's released code, the gradient is rescaled to the norm of the latents, so omega is a step
    size relative to z_t whatever the criterion's scale. `criterion_of` maps z [B, ...] to C [B], differentiably.
    The norms and the rescaling are computed in float32 at least (fgs_worker.guidance.precision); the result
    comes back in the latents' dtype.
    """
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        # Samples are independent, so the gradient of the sum is each sample's own gradient.
        (grad,) = torch.autograd.grad(criterion_of(z).sum(), z)
    grad, latents_wide = at_least_float32(grad), at_least_float32(latents)
    dims = tuple(range(1, grad.ndim))
    grad_norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    latent_norm = torch.linalg.vector_norm(latents_wide, dim=dims, keepdim=True)
    return (grad / (grad_norm + 1e-8) * latent_norm).to(latents.dtype)


def dropped_embeddings(
    embeds: torch.Tensor, seeds: Sequence[int], dropout_p: float, scaling: DropoutScaling
) -> torch.Tensor:
    """Image embeddings [B, D] with each unit dropped with probability p, a mask per image from its own seed."""
    keep = torch.stack(
        [torch.rand(embeds.shape[-1], generator=_dropout_generator(seed)) >= dropout_p for seed in seeds]
    ).to(embeds.device)
    if dropout_p >= 1:
        scale = 0.0
    elif scaling is DropoutScaling.inverted:
        scale = 1.0 / (1.0 - dropout_p)  # keeps the expected embedding
    else:
        scale = 1.0
    return embeds * keep.to(embeds.dtype) * scale


def released_feedback_latents(x0_hat: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """The latents the released code decodes for its classifier: x0_hat * f + z_t * (1 - f), f = sqrt(1 - alpha_t).

    Early in sampling (alpha_t near 0) this is mostly x0_hat; late (alpha_t near 1) mostly z_t, which is then
    close to x0 anyway (fg_pipe.py, cond_fn).
    """
    blend = (1 - alpha_t).sqrt()
    return x0_hat * blend + z_t * (1 - blend)


class ClassifierCriterion(torch.autograd.Function):
    """C(f_phi(pixels)) per image, from the classifier's own call: it returns C and dC/dpixels at once (in a worker,
    from the classifier's confined process: fgs_worker.confined_classifier). Backward hands dC/dpixels to autograd,
    which carries it on through the decode and Eq. 11 to z_t in this process."""

    @staticmethod
    def forward(ctx, pixels, classifier: FeedbackClassifier, criterion: Criterion, labels: torch.Tensor):
        values, gradient = classifier.criterion_and_gradient(pixels.detach(), criterion, labels)
        ctx.save_for_backward(gradient.to(pixels.dtype))
        return values.to(pixels.dtype)

    @staticmethod
    def backward(ctx, grad_values):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_values.view(-1, *[1] * (gradient.ndim - 1)), None, None, None


def min_max_stretch(pixels: torch.Tensor) -> torch.Tensor:
    """Each image shifted by its minimum and divided by its new maximum, both held constant (fg_pipe.py,
    process_image), so the classifier sees [0, 1] whatever the decode's range; the gradient flows through the
    pixels only. The released code runs one image at a time; here each image of a batch has its own min and max.
    """
    dims = tuple(range(1, pixels.ndim))
    shifted = pixels - pixels.detach().amin(dim=dims, keepdim=True)
    return shifted / shifted.detach().amax(dim=dims, keepdim=True)


class GuidedDDIMSampler:
    """Feedback-guided DDIM over the components of a loaded StableUnCLIPImg2ImgPipeline.

    Stateless between calls except for the pipeline's weights: each call builds its own scheduler from the
    pipeline's config, so concurrent jobs never share scheduler state.
    """

    def __init__(self, pipeline: StableUnCLIPImg2ImgPipeline):
        self.pipeline = pipeline
        self.vae_scale_factor = pipeline.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def new_scheduler(self, steps: int):
        """A scheduler of this call's own (schedulers are stateful), built from the pipeline's config."""
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # ------------------------------------------------------------------------------------------------------
    def image_size(self, params: GenerationParams) -> tuple[int, int]:
        """(width, height) of this call: the request's, else the model's native size."""
        native = self.pipeline.unet.config.sample_size * self.vae_scale_factor
        return params.width or native, params.height or native

    def check_inputs(
        self,
        *,
        prompt: str | Sequence[str],
        class_index: int | Sequence[int],
        conditioning_images: Sequence[PIL.Image.Image | None],
        seeds: Sequence[int],
        params: GenerationParams | Sequence[GenerationParams],
        classifier: Classifier | None,
    ) -> None:
        """Raise InvalidJob naming the first bad argument; runs before any model work.

        The parameters' own ranges are GenerationParams' (pydantic); what is checked here depends on the
        loaded model or classifier, and that the images of one call can share a loop.
        """
        if len(seeds) < 1:
            raise InvalidJob("seeds must hold one seed per image (at least one)")
        prompts = per_image(prompt, len(seeds), "prompt")
        if not all(isinstance(p, str) and p for p in prompts):
            raise InvalidJob("prompt must be a non-empty string")
        if len(conditioning_images) not in (0, 1, len(seeds)):
            raise InvalidJob(
                f"conditioning_images must hold 0 (text only), 1 (shared) or {len(seeds)} (one per seed) images, "
                f"got {len(conditioning_images)}"
            )
        all_params = per_image(params, len(seeds), "params")
        if len({p.shared_batch_key() for p in all_params}) > 1:
            raise InvalidJob(
                "the images of one call must agree on GenerationParams.shared_batch_key (steps, size, criterion, ...)"
            )
        params = all_params[0]
        steps = params.steps
        train_steps = self.pipeline.scheduler.config.num_train_timesteps
        if steps > train_steps or int(self.new_scheduler(steps).timesteps.max()) >= train_steps:
            raise InvalidJob(
                f"steps={steps} is more than this model's scheduler can take (its timesteps run to {train_steps - 1})"
            )
        width, height = self.image_size(params)
        if width % self.vae_scale_factor or height % self.vae_scale_factor:
            raise InvalidJob(
                f"width and height must be positive multiples of {self.vae_scale_factor}, got {width}x{height}"
            )
        max_noise = self.pipeline.image_noising_scheduler.config.num_train_timesteps
        if not 0 <= params.noise_level < max_noise:
            raise InvalidJob(f"noise_level must be in [0, {max_noise - 1}], got {params.noise_level}")
        criterion = params.criterion
        if criterion is Criterion.none:
            return
        classifier = as_feedback_classifier(classifier)
        if classifier is None:
            raise InvalidJob(f"criterion '{criterion.value}' needs a classifier")
        for index in per_image(class_index, len(seeds), "class_index"):
            if not 0 <= index < classifier.spec.num_classes:
                raise InvalidJob(
                    f"class_index {index} is outside the classifier's {classifier.spec.num_classes} classes "
                    "(classifier with the wrong number of classes?)"
                )
        if criterion is Criterion.hardness and not classifier.has_hardness_stats:
            raise InvalidJob("criterion 'hardness' needs a classifier uploaded with hardness statistics")

    # ------------------------------------------------------------------------------------------------------
    def _image_embeddings(
        self,
        conditioning_images: Sequence[PIL.Image.Image | None],
        seeds: Sequence[int],
        params: Sequence[GenerationParams],
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """CLIP image embedding per image, dropout p (section 2.3), then unCLIP noise augmentation."""
        pipe = self.pipeline
        batch = len(seeds)
        embed_dim = pipe.image_normalizer.mean.shape[-1]
        encoder = pipe.image_encoder
        # Text only (no image, or None for that image): a zero image embedding, as unCLIP's unconditional branch.
        zeros = torch.zeros(1, embed_dim, device=self.device, dtype=encoder.dtype)
        encoded: dict[int, torch.Tensor] = {}
        for image in conditioning_images:
            # One image per encoder call, each distinct image once: an image's embedding is then the same bits
            # whichever batch (or shared batch) it is part of.
            if image is not None and id(image) not in encoded:
                pixel_values = pipe.feature_extractor(images=[image], return_tensors="pt").pixel_values
                encoded[id(image)] = encoder(pixel_values.to(self.device, encoder.dtype)).image_embeds
        if len(conditioning_images) != batch:  # none, or one for every image
            conditioning_images = [conditioning_images[0] if conditioning_images else None] * batch
        rows = []
        for image, seed, p in zip(conditioning_images, seeds, params, strict=True):
            row = zeros if image is None else encoded[id(image)]
            if p.dropout_p > 0:
                # Section 2.3: drop embedding units with probability p, a mask per image from its own seed. The
                # paper does not say whether the kept units are rescaled: `dropout_scaling` chooses. p = 1 is the
                # text-only zero embedding either way.
                row = dropped_embeddings(row, [seed], p.dropout_p, p.dropout_scaling)
            rows.append(row)
        embeds = torch.cat(rows)
        # unCLIP noise augmentation: normalise, add noise at `noise_level` (one level per call: shared_batch_key),
        # append the level's timestep embedding.
        return pipe.noise_image_embeddings(image_embeds=embeds, noise_level=params[0].noise_level, generator=generators)

    def _noise_prediction(self, state: _Rows, t: torch.Tensor, scheduler) -> torch.Tensor:
        """The UNet's output for z_t under classifier-free guidance (Eq. 12): uncond + gamma * (cond - uncond),
        each image with its own gamma."""
        latents, prompt_embeds, image_embeds = state.unet_inputs()
        model_input = scheduler.scale_model_input(latents, t)
        output = self.pipeline.unet(
            model_input, t, encoder_hidden_states=prompt_embeds, class_labels=image_embeds, return_dict=False
        )[0]
        if state.uncond_prompt is not None:
            uncond, cond = output.chunk(2)
            output = uncond + state.gammas * (cond - uncond)
        return output

    @staticmethod
    def _predicted_noise(
        scheduler, model_output: torch.Tensor, latents: torch.Tensor, alpha_t: torch.Tensor
    ) -> torch.Tensor:
        """eps_hat from the UNet output, for epsilon- and v-prediction models (SD 2.1 unCLIP predicts v)."""
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * latents
        raise InvalidJob(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")

    def decode_for_classifier(
        self, x0_latents: torch.Tensor, classifier: Classifier, resolution: FeedbackResolution
    ) -> torch.Tensor:
        """VAE-decode predicted x0 latents to pixels in [0, 1] (differentiably) for the classifier.

        The latents may come in float32 (Eq. 11 is computed in it); the decode runs in the VAE's dtype.
        """
        vae = self.pipeline.vae
        if resolution is FeedbackResolution.classifier:
            # Decode straight at the classifier's size: the VAE decoder's cost scales with its output pixels.
            side = max(1, math.ceil(classifier.spec.input_size / self.vae_scale_factor))
            if x0_latents.shape[-2:] != (side, side):
                x0_latents = F.interpolate(x0_latents, size=(side, side), mode="bilinear", align_corners=False)
        decoded = vae.decode((x0_latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        # No clamp: clamping would zero the gradient of every saturated pixel. Upcast: the stretch and the
        # classifier's preprocessing (resize, normalisation) then run in float32, as the classifier does.
        return at_least_float32(decoded) / 2 + 0.5

    def feedback_criterion(
        self,
        z: torch.Tensor,
        *,
        t: torch.Tensor,
        alpha_t: torch.Tensor,
        scheduler,
        guided_output: torch.Tensor,
        cond_prompt_embeds: torch.Tensor,
        cond_image_embeds: torch.Tensor,
        classifier: Classifier,
        criterion: Criterion,
        labels: torch.Tensor,
        gradient_path: GradientPath,
        resolution: FeedbackResolution,
        feedback_input: FeedbackInput = FeedbackInput.x0,
    ) -> torch.Tensor:
        """C(f_phi(D(x0_hat(z_t)))) per image, differentiable in z_t (section 2.1.2); with feedback_input
        'released', C of the released code's blend of x0_hat and z_t, min-max stretched.

        eps_hat and x0_hat are computed in float32 at least whatever the model's dtype (`alpha_t` should be too):
        in 16 bits they lose most of their digits early in sampling (fgs_worker.guidance.precision).
        """
        z_wide = at_least_float32(z)
        if gradient_path is GradientPath.unet:
            # Through the UNet, on the conditional branch, as the paper's released code does.
            model_input = scheduler.scale_model_input(z, t)
            output = self.pipeline.unet(
                model_input,
                t,
                encoder_hidden_states=cond_prompt_embeds,
                class_labels=cond_image_embeds,
                return_dict=False,
            )[0]
            eps_hat = self._predicted_noise(scheduler, at_least_float32(output), z_wide, alpha_t)
        else:
            # eps_hat held constant: dx0_hat/dz_t = 1 / sqrt(alpha_t), no UNet backward.
            eps_hat = self._predicted_noise(scheduler, at_least_float32(guided_output), z_wide, alpha_t).detach()
        # Eq. 11, "predicted x0": x0_hat = (z_t - sqrt(1 - alpha_t) eps_hat) / sqrt(alpha_t)
        x0_hat = (z_wide - (1 - alpha_t).sqrt() * eps_hat) / alpha_t.sqrt()
        if feedback_input is FeedbackInput.released:
            pixels = min_max_stretch(
                self.decode_for_classifier(released_feedback_latents(x0_hat, z_wide, alpha_t), classifier, resolution)
            )
        else:
            pixels = self.decode_for_classifier(x0_hat, classifier, resolution)
        return ClassifierCriterion.apply(pixels, as_feedback_classifier(classifier), criterion, labels)

    def feedback_gradient(self, latents: torch.Tensor, **kwargs) -> torch.Tensor:
        """grad_z C per image (Eq. 1's feedback term), rescaled to the norm of that image's latents."""
        return rescaled_criterion_gradient(latents, lambda z: self.feedback_criterion(z, **kwargs))

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        *,
        prompt: str | Sequence[str],
        class_index: int | Sequence[int],
        conditioning_images: Sequence[PIL.Image.Image | None] = (),
        seeds: Sequence[int],
        params: GenerationParams | Sequence[GenerationParams] | None = None,
        classifier: Classifier | None = None,
        on_step: StepCallback | None = None,
    ) -> SampleOutput:
        """Sample one image per seed; see the module docstring for the algorithm.

        `prompt`, `class_index` and `params` (criterion, ω, γ, p, steps, ...; default GenerationParams()) are one
        value for every image or one per seed; `conditioning_images` none (text only), one shared, or one per seed
        (None: that image is text only). Images of one call must agree on `GenerationParams.shared_batch_key`.
        """
        pipe = self.pipeline
        batch = len(seeds)
        classifier = as_feedback_classifier(classifier)
        all_params = [p.generation_params() for p in per_image(params or GenerationParams(), batch, "params")]
        # 1. Check inputs, before any model work.
        self.check_inputs(
            prompt=prompt,
            class_index=class_index,
            conditioning_images=conditioning_images,
            seeds=seeds,
            params=all_params,
            classifier=classifier,
        )
        shared = all_params[0]  # what every image agrees on (shared_batch_key)
        criterion, steps, guidance_every = shared.criterion, shared.steps, shared.guidance_every
        width, height = self.image_size(shared)
        feedback_on = criterion is not Criterion.none and shared.omega != 0
        # One CPU generator per image: the same seed gives the same image on any device and in any batch.
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        labels = torch.tensor(per_image(class_index, batch, "class_index"), dtype=torch.long, device=self.device)

        # 2. Text: the class prompt and the empty prompt (Eq. 12's unconditional score), each distinct prompt
        # encoded on its own, so that its embedding does not depend on the other images of the batch.
        do_cfg = shared.gamma != 1.0
        prompts = per_image(prompt, batch, "prompt")
        encoded = {
            text: pipe.encode_prompt(
                prompt=[text], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
            )
            for text in dict.fromkeys(prompts)
        }
        # 3. Image: CLIP embedding, dropout, noise augmentation; the unconditional branch gets zeros.
        image_embeds = self._image_embeddings(conditioning_images, seeds, all_params, generators)

        # 4. A scheduler of this call's own (schedulers are stateful), and z_T ~ N(0, I) per seed.
        scheduler = self.new_scheduler(steps)
        shape = (batch, pipe.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        cond_prompt = torch.cat([encoded[text][0] for text in prompts])
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=cond_prompt.dtype)
        per_row = dict(device=self.device, dtype=cond_prompt.dtype)
        state = _Rows(
            rows=list(range(batch)),
            latents=latents * scheduler.init_noise_sigma,
            cond_prompt=cond_prompt,
            uncond_prompt=torch.cat([encoded[text][1] for text in prompts]) if do_cfg else None,
            cond_image=image_embeds,
            labels=labels,
            gammas=torch.tensor([p.gamma for p in all_params], **per_row).view(-1, 1, 1, 1),
            omegas=torch.tensor([p.omega for p in all_params], **per_row).view(-1, 1, 1, 1),
        )

        # 5. Denoising loop: DDIM (Eq. 11) with feedback every `guidance_every` steps (Eq. 1).
        alphas_cumprod = scheduler.alphas_cumprod.to(self.device)
        for i, t in enumerate(scheduler.timesteps):
            model_output = self._noise_prediction(state, t, scheduler)
            if feedback_on and i % guidance_every == 0:
                # Never in 16 bits: there 1 - alpha_t rounds to 0 near the end (fgs_worker.guidance.precision).
                alpha_t = alphas_cumprod[t].to(compute_dtype(state.latents.dtype))
                grad = self.feedback_gradient(
                    state.latents,
                    t=t,
                    alpha_t=alpha_t,
                    scheduler=scheduler,
                    guided_output=model_output,
                    cond_prompt_embeds=state.cond_prompt,
                    cond_image_embeds=state.cond_image,
                    classifier=classifier,
                    criterion=criterion,
                    labels=state.labels,
                    gradient_path=shared.gradient_path,
                    resolution=shared.feedback_resolution,
                    feedback_input=shared.feedback_input,
                )
                # Eq. 1: + omega * grad C, applied to z_t before the DDIM step.
                state.latents = state.latents + state.omegas * grad
            state.latents = scheduler.step(model_output, t, state.latents, eta=0.0, return_dict=False)[0]
            wanted = on_step(i + 1, steps) if on_step is not None else None
            if wanted is not None and len(wanted) < len(state.rows):
                state = state.keep(wanted)  # images dropped (their job canceled): the others go on unchanged
                if not state.rows:
                    return SampleOutput(images=[], pixels=torch.empty(0), criterion_values=None, probabilities=None)

        # 6. Decode, score the final images under the classifier.
        decoded = pipe.vae.decode(state.latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = (decoded / 2 + 0.5).clamp(0, 1).float()
        values = probabilities = None
        if classifier is not None:
            values, probabilities = classifier.score(pixels, criterion, state.labels)
        arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        images = [PIL.Image.fromarray(array) for array in arrays]
        return SampleOutput(
            images=images, pixels=pixels.cpu(), criterion_values=values, probabilities=probabilities, rows=state.rows
        )
