"""Baseline for bench/sampler.py and bench/gpu.py: feedback-guided sampling the way the paper's released code
runs it (facebookresearch/Feedback-guided-Data-Synthesis, fg_pipe.py), adapted to unCLIP conditioning.

One image per call; the prompt and the conditioning image are encoded anew each call; every 5 steps an extra
conditional UNet forward with gradients, a full-size VAE decode of the predicted x0, min-max normalised,
the classifier and the criterion, the gradient rescaled to the latents' norm and added. This is a
measurement baseline only: the product's loop is fgs_worker/guidance/guided_ddim.py.
"""

from __future__ import annotations

import PIL.Image
import torch

from fgs_classifier.registry import LoadedClassifier
from fgs_common.wire import Criterion
from fgs_worker.guidance import criteria


def reference_guided_image(
    pipe,
    classifier: LoadedClassifier,
    prompt: str,
    class_index: int,
    image: PIL.Image.Image,
    seed: int,
    omega: float,
    gamma: float = 3.0,
    steps: int = 30,
    guidance_every: int = 5,
    side: int | None = None,
) -> torch.Tensor:
    """One entropy-guided image [1, 3, H, W] in [0, 1]."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        text, negative = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        pixel_values = pipe.feature_extractor(images=image, return_tensors="pt").pixel_values.to(device, dtype)
        embeds = pipe.noise_image_embeddings(pipe.image_encoder(pixel_values).image_embeds, 0, generator=generator)
    prompt_embeds = torch.cat([negative, text])
    image_embeds = torch.cat([torch.zeros_like(embeds), embeds])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    side = side or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = torch.randn(1, 4, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor, generator=generator)
    latents = latents.to(device, dtype) * scheduler.init_noise_sigma
    labels = torch.tensor([class_index], device=device)
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            output = pipe.unet(
                torch.cat([latents] * 2),
                t,
                encoder_hidden_states=prompt_embeds,
                class_labels=image_embeds,
                return_dict=False,
            )[0]
            uncond, cond = output.chunk(2)
            output = uncond + gamma * (cond - uncond)
        if i % guidance_every == 0:
            with torch.enable_grad():
                z = latents.detach().requires_grad_(True)
                v = pipe.unet(z, t, encoder_hidden_states=text, class_labels=embeds, return_dict=False)[0]
                a = scheduler.alphas_cumprod[t].to(device)
                eps = a.sqrt() * v + (1 - a).sqrt() * z if scheduler.config.prediction_type == "v_prediction" else v
                x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
                decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample / 2 + 0.5
                decoded = (decoded - decoded.min().detach()) / (decoded.max().detach() - decoded.min().detach())
                logits, _ = classifier(decoded)
                value = criteria.evaluate(Criterion.entropy, logits, labels)
                (grad,) = torch.autograd.grad(value.sum(), z)
            latents = latents + omega * grad / (grad.norm() + 1e-8) * latents.norm()
        with torch.no_grad():
            latents = scheduler.step(output, t, latents, return_dict=False)[0]
    with torch.no_grad():
        return (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
