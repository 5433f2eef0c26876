"""What the guided loop computes in float32 whatever dtype the model runs in (FGS_DTYPE), and why.

The UNet, the VAE and the text and image encoders run in the model's dtype (float16 or bfloat16 on a GPU).
A few small computations are upcast, because their error in a 16-bit type is not the small relative error of
one rounding:

- Eq. 11, the predicted x0 (and eps_hat from a v-prediction): early in sampling z_t and sqrt(1 - alpha_t) eps_hat
  nearly cancel and their difference is divided by sqrt(alpha_t) (0.087 at the first of 30 DDIM steps). Computed
  in bfloat16 (8-bit mantissa), the tiny model's first feedback gradient had a mean cosine of 0.52-0.91 to the
  float32 one over the 12 cases of tests/test_reduced_precision.py, against 0.87-0.97 with this upcast; on the
  trained fgs-digits model both were 0.92-1.00, so the gain there is within noise.
- The schedule's alpha_t: in bfloat16, 1 - alpha_t near the end of sampling (alpha_t ~ 0.998) rounds to 0 or to
  0.0039.
- The norms that rescale the feedback gradient (sums of squares over a whole latent).
- The criteria (log-softmax, Eq. 2 and 4) and the hardness score, which goes on to float64
  (fgs_classifier.hardness_stats).

float64 stays float64 (the finite-difference tests run the whole loop in it).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a 16-bit float, else `dtype` itself (float32, float64)."""
    return torch.promote_types(dtype, torch.float32)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` upcast to float32 if it is a 16-bit float (differentiably), else unchanged."""
    return tensor.to(compute_dtype(tensor.dtype))
