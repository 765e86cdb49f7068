"""Batched training augmentation of the evaluation recipe, on tensors already on the device.

Per batch: RandomResizedCrop(scale, ratio 3/4–4/3) + horizontal flip (one affine warp), ColorJitter
(brightness, contrast, saturation, in that order), PCA lighting noise (AlexNet's ImageNet eigenvectors),
then CutMix on the normalized batch. Every random draw comes from the caller's generators, so a seed fixes
the whole run. Pixel values are in [0, 1] until normalization.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ImageNet RGB PCA (AlexNet / fb.resnet.torch): eigenvalues and eigenvectors (columns)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
LUMA = (0.299, 0.587, 0.114)


def random_resized_crop(x: Tensor, scale: tuple[float, float], flip: bool, generator: torch.Generator) -> Tensor:
    """Batched RandomResizedCrop(scale, ratio 3/4–4/3) + optional horizontal flip, one affine warp."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1)  # crop width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _factors(b: int, strength: float, generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.empty(b).uniform_(1 - strength, 1 + strength, generator=generator).to(like).view(b, 1, 1, 1)


def color_jitter(x: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation factors uniform in [1 − s, 1 + s] per image (x in [0, 1]).

    Contrast blends with the image's mean gray level, saturation with its per-pixel gray image."""
    b = x.shape[0]
    x = (x * _factors(b, strength, generator, x)).clamp_(0, 1)  # brightness (a new tensor: x is not modified)
    luma = _luma(x)
    mean = (x.mean((2, 3), keepdim=True) * luma).sum(1, keepdim=True)  # [B, 1, 1, 1] mean gray level
    contrast = _factors(b, strength, generator, x)
    x.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)  # (x − m)·contrast + m
    if x.shape[1] == 3:
        gray = (x * luma).sum(1, keepdim=True)  # [B, 1, H, W]
        s = _factors(b, strength, generator, x)
        x.mul_(s).add_(gray * (1 - s)).clamp_(0, 1)  # saturation: (x − gray)·s + gray
    return x


def _luma(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return torch.ones(1, 1, 1, 1, dtype=x.dtype, device=x.device)
    return torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


def lighting(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """AlexNet PCA lighting: add eigvec · (α ⊙ eigval), α ~ N(0, std), per image (RGB only)."""
    if x.shape[1] != 3:
        return x
    alpha = torch.randn(x.shape[0], 3, generator=generator) * std  # [B, 3]
    rgb = (alpha * torch.tensor(PCA_EIGVAL)) @ torch.tensor(PCA_EIGVEC).T  # [B, 3]
    return x + rgb.to(x).view(-1, 3, 1, 1)


def cutmix(x: Tensor, beta: float, generator: torch.Generator,
           rng: np.random.Generator) -> tuple[Tensor, Tensor, float]:
    """Paste a random box from a shuffled copy of the batch. Returns (mixed x, permutation, λ) where λ is
    the exact share of each image that kept its own pixels: loss = λ CE(y) + (1 − λ) CE(y[perm])."""
    b, _, h, w = x.shape
    lam = float(rng.beta(beta, beta))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(b, generator=generator).to(x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)
