"""The LeNet-style network of seed 001, Table 6 (dSprites, 64x64 grey inputs).

=====  ==============================  ====================================
layer  type                            activation and normalisation
=====  ==============================  ====================================
1      Conv2d(c=6, k=5)                ReLU, average pooling, batch norm
2      Conv2d(c=16, k=5)               ReLU, average pooling, batch norm
3      Linear(out=120)                 ReLU, batch norm
4      Linear(out=84)                  ReLU, batch norm
5      Linear(out=84)                  ReLU, batch norm
head   Linear(out=K)                   -
=====  ==============================  ====================================

The representation ``g`` is the 84-dimensional output of layer 5.
"""

from __future__ import annotations

from torch import Tensor, nn

FEATURE_DIM = 84


class LeNetFeatures(nn.Module):
    """Layers 1-5 of Table 6: ``[N, 1, 64, 64] -> [N, 84]``."""

    def __init__(self, in_channels: int = 1, size: int = 64) -> None:
        super().__init__()
        side = ((size - 4) // 2 - 4) // 2
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(6),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(16),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(), nn.BatchNorm1d(120),
            nn.Linear(120, 84), nn.ReLU(), nn.BatchNorm1d(84),
            nn.Linear(84, FEATURE_DIM), nn.ReLU(), nn.BatchNorm1d(FEATURE_DIM),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


class LeNet(nn.Module):
    """Table 6 network with a linear ``head`` on the 84-dimensional representation."""

    def __init__(self, num_outputs: int = 1) -> None:
        super().__init__()
        self.features = LeNetFeatures()
        self.head = nn.Linear(FEATURE_DIM, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
