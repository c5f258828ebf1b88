"""A digit classifier that scores samples: prompt accuracy = share of samples classified as the prompted digit.

Multinomial logistic regression on the 64 pixels (scikit-learn, fitted once on the training split of the demo
data). Only its coefficients ship (`weights` [10, 64], `bias` [10] in a small safetensors file), so scoring
needs torch alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ProjectionError
from .digits import NUM_CLASSES, SIZE, Digits


@dataclass(frozen=True)
class DigitClassifier:
    weights: torch.Tensor  # [10, 64]
    bias: torch.Tensor  # [10]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 8, 8] (pixels in [0, 1]; clipped to it, as a generated image is drawn) -> [N, 10]."""
        if images.shape[1:] != (SIZE, SIZE):
            raise ProjectionError(f"digit images must be [N, {SIZE}, {SIZE}], got {list(images.shape)}")
        return images.reshape(len(images), -1).float().clamp(0, 1) @ self.weights.T + self.bias

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1)

    def prompt_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of images classified as their prompted digit (labels [N])."""
        if len(images) != len(labels) or not len(images):
            raise ProjectionError(f"prompt accuracy needs one label per image, got {len(labels)} for {len(images)}")
        return (self.predict(images) == labels.to(torch.long)).float().mean().item()

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        save_file({"weights": self.weights.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata)


def load_classifier(path: str | Path) -> DigitClassifier:
    tensors = load_file(str(path))
    weights, bias = tensors.get("weights"), tensors.get("bias")
    if weights is None or bias is None or weights.shape != (NUM_CLASSES, SIZE * SIZE) or bias.shape != (NUM_CLASSES,):
        raise ProjectionError(f"{path}: not a digit classifier (needs weights [{NUM_CLASSES}, {SIZE * SIZE}] and "
                              f"bias [{NUM_CLASSES}])")
    return DigitClassifier(weights.float(), bias.float())


def fit_classifier(data: Digits, regularization: float = 1.0, **options: Any) -> DigitClassifier:
    """Fit the logistic regression on `data` (needs scikit-learn; deterministic: lbfgs, no sampling)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=regularization, max_iter=2000, **options)
    model.fit(data.images.reshape(len(data.images), -1).double().numpy(), data.labels.numpy())
    return DigitClassifier(torch.from_numpy(model.coef_).float(), torch.from_numpy(model.intercept_).float())
