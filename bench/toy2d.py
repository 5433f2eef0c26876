"""The paper's toy example (App. A.3, Figure 6): entropy feedback moves DDPM samples into minority modes.

Two classes, each a Gaussian mixture with a 90% majority and a 10% minority mode. A class-conditional
denoiser is trained on it; a linear classifier trained on the imbalanced data classifies the majority modes
but its decision boundary runs through the minority modes. Sampling with DDIM, with and without entropy
feedback from that classifier, through the same criteria (fgs_worker.guidance.criteria) and the same
feedback step (rescaled_criterion_gradient, Eq. 1) as the unCLIP sampler. Prints the minority-mode
fraction, the share of samples that stay in their class and on the data, and writes a scatter plot.

    .venv/bin/python bench/toy2d.py [--out bench/toy2d.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from fgs_common.wire import Criterion
from fgs_worker.guidance import criteria
from fgs_worker.guidance.guided_ddim import rescaled_criterion_gradient

# (class, mode) -> centre; majority modes hold 90% of their class.
MODES = {
    (0, "majority"): (-2.5, 0.0),
    (0, "minority"): (0.0, 2.5),
    (1, "majority"): (2.5, 0.0),
    (1, "minority"): (0.0, -2.5),
}
STD = 0.35
MINORITY_SHARE = 0.10


def make_data(n_per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    points, labels, minority = [], [], []
    for label in (0, 1):
        n_minor = int(n_per_class * MINORITY_SHARE)
        for mode, n in (("majority", n_per_class - n_minor), ("minority", n_minor)):
            centre = np.array(MODES[(label, mode)])
            points.append(centre + STD * rng.standard_normal((n, 2)))
            labels += [label] * n
            minority += [mode == "minority"] * n
    return (torch.tensor(np.concatenate(points), dtype=torch.float32), torch.tensor(labels), torch.tensor(minority))


class Denoiser(nn.Module):
    """eps_theta(x_t, t, y): an MLP on (x_t, timestep features, class embedding)."""

    def __init__(self, hidden: int = 96):
        super().__init__()
        self.class_embedding = nn.Embedding(2, 32)
        self.net = nn.Sequential(
            nn.Linear(2 + 16 + 32, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(8) * np.log(1000.0) / 8)
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        return self.net(torch.cat([x, features, self.class_embedding(y)], dim=1))


def train_denoiser(x: torch.Tensor, y: torch.Tensor, scheduler: DDIMScheduler, steps: int, seed: int) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    alphas = scheduler.alphas_cumprod
    for _ in range(steps):
        index = torch.randint(0, len(x), (256,))
        t = torch.randint(0, scheduler.config.num_train_timesteps, (256,))
        noise = torch.randn(256, 2)
        a = alphas[t][:, None]
        noisy = a.sqrt() * x[index] + (1 - a).sqrt() * noise
        loss = ((model(noisy, t, y[index]) - noise) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def train_linear_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Linear:
    """Logistic regression on the imbalanced data, stopped early (App. A.3): the majority modes dominate its
    gradient, so it classifies them while its boundary still runs through the minority modes."""
    torch.manual_seed(seed)
    classifier = nn.Linear(2, 2)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimiser = torch.optim.SGD(classifier.parameters(), lr=0.05)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(classifier(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def sample(model, classifier, scheduler, labels, omega, steps, guidance_every, seed) -> torch.Tensor:
    """DDIM (Eq. 11) with entropy feedback every `guidance_every` steps (Eq. 1, Eq. 4)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    z = torch.randn(len(labels), 2, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((len(labels),), int(t))
        eps = model(z, t_batch, labels)
        if omega and i % guidance_every == 0:
            a = scheduler.alphas_cumprod[t]

            def entropy_of(z_, a=a, t_batch=t_batch):  # called at once, in this iteration
                x0 = (z_ - (1 - a).sqrt() * model(z_, t_batch, labels)) / a.sqrt()  # through the denoiser
                return criteria.evaluate(Criterion.entropy, classifier(x0), labels)

            z = z + omega * rescaled_criterion_gradient(z, entropy_of)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


def nearest_mode(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each point: its nearest mode's class, whether it is a minority mode, and the distance in std units."""
    keys = list(MODES)
    centres = torch.tensor([MODES[k] for k in keys])
    distances = torch.cdist(points, centres)
    index = distances.argmin(1)
    classes = torch.tensor([keys[i][0] for i in index])
    minority = torch.tensor([keys[i][1] == "minority" for i in index])
    return classes, minority, distances.min(1).values / STD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("toy2d.png"))
    parser.add_argument("--omega", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    x, y, _ = make_data(2000, rng)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        prediction_type="epsilon",
        set_alpha_to_one=True,
    )
    model = train_denoiser(x, y, scheduler, args.train_steps, args.seed)
    classifier = train_linear_classifier(x, y, epochs=20, seed=args.seed)
    _, real_minority, _ = nearest_mode(x)
    accuracy_minor = (classifier(x).argmax(1) == y)[real_minority].float().mean().item()

    labels = torch.arange(args.samples) % 2
    rows, results = [], {}
    for name, omega in (("plain DDIM", 0.0), *((f"entropy feedback (omega={o})", o) for o in args.omega)):
        points = sample(model, classifier, scheduler, labels, omega, steps=30, guidance_every=5, seed=args.seed + 1)
        classes, minority, distance = nearest_mode(points)
        results[name] = points
        rows.append(
            (
                name,
                minority.float().mean().item(),
                (classes == labels).float().mean().item(),
                (distance <= 3).float().mean().item(),
                criteria.entropy(classifier(points)).mean().item(),
            )
        )

    print(f"linear classifier accuracy on the real minority modes: {accuracy_minor:.2f} (majority modes are right)")
    print(f"{'sampler':<34} {'minority share':>14} {'in class':>9} {'on data (<=3 std)':>18} {'mean entropy':>13}")
    for name, share, in_class, on_data, entropy in rows:
        print(f"{name:<34} {share:>14.3f} {in_class:>9.3f} {on_data:>18.3f} {entropy:>13.3f}")
    for row in rows[1:]:
        print(f"minority share ratio, {row[0]} / plain: {row[1] / max(rows[0][1], 1e-9):.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("(a) real data", x, y)] + [
        (f"({c}) {n}", p, labels) for c, (n, p) in zip("bcdef", results.items(), strict=False)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.3), sharex=True, sharey=True)
    grid = torch.linspace(-4.5, 4.5, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    boundary = classifier(torch.stack([gx.flatten(), gy.flatten()], 1)).softmax(1)[:, 1].reshape(gx.shape)
    for axis, (title, points, classes) in zip(axes, panels, strict=False):
        axis.contour(gx, gy, boundary, levels=[0.5], colors="k", linestyles="--", linewidths=1)
        axis.scatter(
            points[:, 0], points[:, 1], c=np.where(classes.numpy() == 0, "tab:blue", "tab:red"), s=3, alpha=0.5
        )
        axis.set_title(title)
        axis.set_aspect("equal")
    fig.suptitle("Entropy feedback from a linear classifier (dashed: its boundary) samples the minority modes")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"scatter plot: {args.out}   ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
