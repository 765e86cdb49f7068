"""Evaluation-training throughput: the tensor-resident batched pipeline (diffdistill.augment) vs a
per-sample PIL + DataLoader pipeline with the same recipe (RandomResizedCrop 0.5-1, flip, ColorJitter 0.4,
PCA lighting 0.1, normalize, CutMix). Images/s, pipeline alone and with a ConvNet-6 training step.
Prints JSON. Goal: >= 3x. Ratios come from one run on one machine.
"""

import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from diffdistill.augment import PCA_EIGVAL, PCA_EIGVEC, color_jitter, cutmix, lighting, random_resized_crop
from diffdistill.config import EvalConfig
from diffdistill.models.classifiers import build_classifier
from diffdistill.runtime import package_versions

BATCH = 64
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class PilDataset(torch.utils.data.Dataset):
    """The classic per-sample path: PIL image in memory -> PIL transforms -> tensor."""

    def __init__(self, images: list[Image.Image], size: int) -> None:
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img, s = self.images[i], self.size
        area = img.width * img.height * random.uniform(0.5, 1.0)
        ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(img.width, round(math.sqrt(area * ratio)))
        h = min(img.height, round(math.sqrt(area / ratio)))
        x0, y0 = random.randint(0, img.width - w), random.randint(0, img.height - h)
        img = img.resize((s, s), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(random.uniform(0.6, 1.4))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        alpha = torch.randn(3) * 0.1
        x = x + ((alpha * torch.tensor(PCA_EIGVAL)) @ torch.tensor(PCA_EIGVEC).T).view(3, 1, 1)
        return (x - MEAN) / STD, i % 10


def pil_batches(images, size: int, n_batches: int):
    loader = torch.utils.data.DataLoader(PilDataset(images, size), batch_size=BATCH, shuffle=True, num_workers=2,
                                         drop_last=True, persistent_workers=False)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for i, (x, y) in enumerate(loader):
        if i == n_batches:
            break
        x, perm, lam = cutmix(x, 1.0, gen, rng)
        yield x, y, perm, lam


def tensor_batches(x01: torch.Tensor, labels: torch.Tensor, n_batches: int):
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    mean, std = MEAN[None], STD[None]
    for _ in range(n_batches):
        idx = torch.randint(len(labels), (BATCH,), generator=gen)
        xb = lighting(color_jitter(random_resized_crop(x01[idx], (0.5, 1.0), True, gen), 0.4, gen), 0.1, gen)
        xb, perm, lam = cutmix((xb - mean).div_(std), 1.0, gen, rng)
        yield xb, labels[idx], perm, lam


def images_per_second(batches, model=None) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if model is not None else None
    start, n = time.perf_counter(), 0
    for x, y, perm, lam in batches:
        if model is not None:
            out = model(x)
            loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
        n += len(y)
    return n / (time.perf_counter() - start)


def measure(size: int, n_images: int, batches_pipeline: int, batches_train: int) -> dict:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n_images) % 10
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in data]
    x01 = data.float() / 255  # the whole set resident (on the GPU in real runs)
    out = {}
    for name, model_fn in (("pipeline_only", lambda: None),
                           ("with_convnet6_training", lambda: build_classifier("convnet6", 3, 10, size))):
        n = batches_pipeline if model_fn() is None else batches_train
        torch.manual_seed(0)
        t = images_per_second(tensor_batches(x01, labels, n), model_fn())
        p = images_per_second(pil_batches(pil, size, n), model_fn())
        out[name] = {"tensor_images_per_s": round(t, 1), "pil_dataloader_images_per_s": round(p, 1),
                     "ratio": round(t / p, 2)}
    return out


def main() -> None:
    torch.set_num_threads(2)
    assert EvalConfig().color_jitter == 0.4 and EvalConfig().lighting == 0.1  # the recipe benchmarked
    result = {"benchmark": "evaluation pipeline", "batch": BATCH,
              "64px": measure(64, 640, 20, 4), "224px": measure(224, 320, 8, 2),
              "torch_threads": torch.get_num_threads(), "versions": package_versions()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
