"""The side-by-side PNG of reference and policy samples, each panel named and scored in a header."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from prefopt.atomic import atomic_path


def _panel(images: torch.Tensor, labels: torch.Tensor, per_class: int, upscale: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    picked = torch.cat([images[labels == c][:per_class] for c in labels.unique().tolist()])
    picked = F.interpolate((picked.float() + 1) / 2, scale_factor=upscale, mode="nearest")
    return make_grid(picked, nrow=per_class, padding=2, pad_value=0.5).clamp(0, 1)


def save_side_by_side(reference: torch.Tensor, policy: torch.Tensor, labels: torch.Tensor, per_class: int,
                      path: Path, upscale: int = 6, titles: Sequence[str] = ("reference", "policy")) -> None:
    """A PNG: one row per class, reference samples on the left, the policy's (same noise) on the right.

    Each panel has a header line with its title (e.g. ``"policy: thickness 1.440"``); a panel narrower than
    its title is padded so the title fits. Written through a temporary file and a rename.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panels = []
    for images, title in zip((reference, policy), titles):
        grid = _panel(images, labels, per_class, upscale)
        array = (grid.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy())
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        left, top, right, bottom = measure.textbbox((0, 0), title, font=font)
        width = max(array.shape[1], right - left + 8)
        header = bottom - top + 8
        canvas = Image.new("RGB", (width, header + array.shape[0]), (255, 255, 255))
        canvas.paste(Image.fromarray(array), ((width - array.shape[1]) // 2, header))
        ImageDraw.Draw(canvas).text(((width - (right - left)) // 2 - left, 4 - top), title, fill=(0, 0, 0),
                                    font=font)
        panels.append(canvas)
    gap = 4 * upscale
    height = max(p.height for p in panels)
    out = Image.new("RGB", (panels[0].width + gap + panels[1].width, height), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (panels[0].width + gap, 0))
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")


def panel_titles(reward: str, reference: float, policy: float, win_rate: float | None = None) -> tuple[str, str]:
    """``("reference: <reward> <mean>", "policy: <reward> <mean>, wins W%")``."""
    ref = f"reference: {reward} {reference:.3f}"
    pol = f"policy: {reward} {policy:.3f}"
    if win_rate is not None:
        pol += f", wins {100 * win_rate:.0f}%"
    return ref, pol
