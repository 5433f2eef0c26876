"""A two-class TorchScript-able classifier on 8x8 RGB that returns (logits, embedding)."""

from __future__ import annotations

import torch


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3 * 8 * 8, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x.flatten(1))
        return self.head(embedding), embedding
