"""Image rewards that need no download.

Every reward maps images ``[N, C, H, W]`` in ``[-1, 1]`` (and, where it needs them, the intended class
labels ``[N]``) to one float per image, higher = better. Ink is ``(x + 1) / 2`` averaged over channels,
so a white stroke on black (the digits) has ink 1.

=====================  ===================================================================================
``ink``                mean ink of the image: bolder, larger digits score higher (a style reward)
``thickness``          stroke thickness ``2 * ink mass / total variation`` in pixels: the ink per unit of
                       stroke edge, so it grows with the width of a stroke, not with its length or with a
                       uniform brightening (the held-out judge of ``ink``)
``compressibility``    minus the PNG size of the image in kB (DDPO's compressibility with PNG)
``jpeg_compressibility``  minus the JPEG size (quality 95) in kB (the held-out judge of ``compressibility``)
``legibility``         probability of the intended class under a digit classifier (the task's reward
                       classifier; the held-out judge is a second classifier trained on other digits)
=====================  ===================================================================================
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prefopt.errors import PrefoptError

Reward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _ink(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).mean(dim=1)  # [N, H, W]


def ink(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ink per image, in ``[0, 1]``."""
    return _ink(images).flatten(1).mean(1)


def thickness(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``2 * sum(ink) / total_variation(ink)``: for a stroke of width ``w`` and length ``l >> w`` this is
    about ``2 w l / 2 l = w`` pixels. The image is zero-padded so edges at the border count."""
    p = F.pad(_ink(images), (1, 1, 1, 1))
    tv = (p[:, 1:, :] - p[:, :-1, :]).abs().flatten(1).sum(1) + (p[:, :, 1:] - p[:, :, :-1]).abs().flatten(1).sum(1)
    return 2.0 * p.flatten(1).sum(1) / tv.clamp_min(1e-6)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    arr = (_ink(images) if images.shape[1] != 3 else ((images.float() + 1) / 2).clamp(0, 1)) * 255
    arr = arr.round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(arr, 1, -1) if arr.ndim == 4 else arr


def _encoded_kb(images: torch.Tensor, fmt: str, scale: int, **options) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for arr in _to_uint8(images):
        image = Image.fromarray(arr)
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def compressibility(images: torch.Tensor, labels: torch.Tensor | None = None, scale: int = 4) -> torch.Tensor:
    """Minus the PNG size in kB (images upscaled ``scale`` x with nearest neighbours first, so that the
    file size is dominated by the picture rather than by the headers of a tiny file)."""
    return -_encoded_kb(images, "PNG", scale, optimize=True)


def jpeg_compressibility(images: torch.Tensor, labels: torch.Tensor | None = None, scale: int = 4) -> torch.Tensor:
    """Minus the JPEG size (quality 95) in kB, as in DDPO."""
    return -_encoded_kb(images, "JPEG", scale, quality=95)


class Legibility:
    """Probability of the intended class under ``classifier`` (a module mapping images to logits)."""

    def __init__(self, classifier: torch.nn.Module):
        self.classifier = classifier.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise PrefoptError("reward 'legibility' needs the intended class labels of the images")
        device = next(self.classifier.parameters()).device
        probs = self.classifier(images.float().to(device)).softmax(-1)
        return probs.gather(1, labels.to(device).long()[:, None])[:, 0].cpu()


#: rewards that need nothing but the images
PIXEL_REWARDS: dict[str, Reward] = {
    "ink": ink,
    "thickness": thickness,
    "compressibility": compressibility,
    "jpeg_compressibility": jpeg_compressibility,
}
REWARDS = (*PIXEL_REWARDS, "legibility")
#: the held-out judge of each training reward (not the same signal)
HELD_OUT = {"ink": "thickness", "thickness": "ink", "compressibility": "jpeg_compressibility",
            "jpeg_compressibility": "compressibility", "legibility": "legibility"}
