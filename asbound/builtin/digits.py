"""A small CNN for scikit-learn's 8x8 handwritten digits (1 channel, pixels in [0, 1]).

=====  ================================  ==========================
layer  type                              activation and normalisation
=====  ================================  ==========================
1      Conv2d(c=16, k=3, padding 1)      ReLU, batch norm
2      Conv2d(c=32, k=3, stride 2, p 1)  ReLU, batch norm (4x4)
3      Linear(out=64)                    ReLU
head   Linear(out=K)                     -
=====  ================================  ==========================

The representation ``g`` is the 64-dimensional output of layer 3.
"""

from __future__ import annotations

from torch import Tensor, nn

FEATURE_DIM = 64


class DigitsFeatures(nn.Module):
    """Layers 1-3: ``[N, 1, 8, 8] -> [N, 64]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(32),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


class DigitsNet(nn.Module):
    """The digits CNN with a linear ``head`` on its 64-dimensional representation."""

    def __init__(self, num_outputs: int = 10) -> None:
        super().__init__()
        self.features = DigitsFeatures()
        self.head = nn.Linear(FEATURE_DIM, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
