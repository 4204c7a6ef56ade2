"""PyTorch twins of lungct's models, for benchmarking only (channels-first NCDHW).

Same layers, widths, strides, paddings and BatchNorm settings as
`lungct.models.cnn3d.CNN3D` and `lungct.models.resnet3d.ResNet3D`, so a training
step does the same arithmetic. PyTorch is optional: import this module only
after checking that `torch` is importable.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TorchCNN3D(nn.Module):
  """The Keras tutorial CNN: 4 x [Conv3d(3, VALID) + relu -> MaxPool3d(2) -> BN], GAP, Dense, Dropout, Dense."""

  def __init__(self, num_outputs: int = 1, features: Sequence[int] = (64, 64, 128, 256),
               dense: int = 512, dropout: float = 0.3, in_channels: int = 1):
    super().__init__()
    layers: list[nn.Module] = []
    widths = (in_channels, *features)
    for i in range(len(features)):
      layers += [nn.Conv3d(widths[i], widths[i + 1], 3), nn.ReLU(inplace=True), nn.MaxPool3d(2),
                 nn.BatchNorm3d(widths[i + 1], eps=1e-3, momentum=0.01)]  # Keras momentum 0.99
    self.features = nn.Sequential(*layers)
    self.dense = nn.Linear(features[-1], dense)
    self.dropout = nn.Dropout(dropout)
    self.head = nn.Linear(dense, num_outputs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x).mean(dim=(2, 3, 4))
    return self.head(self.dropout(torch.relu(self.dense(x))))


def _conv(in_f: int, out_f: int, k: int, stride) -> nn.Conv3d:
  return nn.Conv3d(in_f, out_f, k, stride=stride, padding=k // 2, bias=False)


class _BasicBlock(nn.Module):
  def __init__(self, in_f: int, planes: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_f, planes, 3, stride), nn.BatchNorm3d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, 1), nn.BatchNorm3d(planes)
    self.shortcut = (nn.Sequential(_conv(in_f, planes, 1, stride), nn.BatchNorm3d(planes))
                     if stride != 1 or in_f != planes else nn.Identity())

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + self.shortcut(x))


class TorchResNet3D(nn.Module):
  """3D ResNet-10/18/34 as in lungct: 7^3 stem (stride (1,2,2)), max-pool 3/2, 4 stages, GAP, head.

  The nodule recipe (configs/nodule.py) uses stem_kernel=3, stem_stride=1, stem_pool=False."""

  def __init__(self, num_outputs: int = 1, depth: int = 18, width: int = 64, dropout: float = 0.0,
               in_channels: int = 1, stem_stride=(1, 2, 2), stem_kernel: int = 7, stem_pool: bool = True):
    super().__init__()
    counts = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    self.stem = nn.Sequential(_conv(in_channels, width, stem_kernel, stem_stride), nn.BatchNorm3d(width),
                              nn.ReLU(inplace=True), *([nn.MaxPool3d(3, 2, 1)] if stem_pool else []))
    blocks, in_f = [], width
    for stage, count in enumerate(counts):
      planes = width * 2 ** stage
      for i in range(count):
        blocks.append(_BasicBlock(in_f, planes, 2 if stage > 0 and i == 0 else 1))
        in_f = planes
    self.blocks = nn.Sequential(*blocks)
    self.dropout = nn.Dropout(dropout)
    self.head = nn.Linear(in_f, num_outputs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.blocks(self.stem(x)).mean(dim=(2, 3, 4))
    return self.head(self.dropout(x))


def create(model: str, **kwargs) -> nn.Module:
  """'cnn3d' | 'resnet18' | 'nodule' (configs/nodule.py's ResNet-10) -> the PyTorch twin (1 output: binary logits)."""
  if model == "cnn3d":
    return TorchCNN3D(**kwargs)
  if model == "resnet18":
    return TorchResNet3D(depth=18, **kwargs)
  if model == "nodule":
    return TorchResNet3D(depth=10, width=8, dropout=0.2, stem_stride=1, stem_kernel=3, stem_pool=False, **kwargs)
  raise ValueError(f"unknown model {model!r}")
