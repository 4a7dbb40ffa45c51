"""LeNet-5 (LeCun et al. 1998) with ReLU/max-pool, the modern textbook variant; torchvision has none."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc(num_classes).

    Every layer is a direct child, in forward order, so transfer.stages() can treat each as a stage;
    the head is `fc3`, like the other families' heads it is the last registered child.
    """

    # conv5 -> pool2 -> conv5 -> pool2 needs 16x16 input (measured: 15 leaves 0x0 after pool2). The adaptive
    # pool (identity at the canonical 32x32) lets any bigger input through without changing fc1.
    min_size = 16

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.act1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.act2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.act3 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(120, 84)
        self.act4 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        x = self.act4(self.fc2(self.act3(self.fc1(x))))
        return self.fc3(x)
