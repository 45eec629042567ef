"""A compact U-Net that finds HER2+ cancer cells, their nucleus centres and Ki67 status.

Input ``(N, 4, H, W)`` float: the normalised DAPI, HER2 and Ki67 channels (see
`models.infer.normalise`) and a constant plane that is 1 where Ki67 was imaged and 0 where it
was not (then the Ki67 plane is zeros), at `input_um_per_px` (1 um/px for the shipped model).
``H`` and ``W`` must be multiples of ``2 ** depth``.

Output ``(N, 3, H, W)`` logits:

0. ``cell``: the pixel belongs to a HER2+ cancer cell;
1. ``centre``: a Gaussian bump (sigma 1.5 px) at each cancer-cell nucleus centre, so that cells
   packed in a focus are counted one by one as peaks;
2. ``ki67``: the same bump, only for Ki67+ cancer nuclei.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUTS = ("cell", "centre", "ki67")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with `depth` down/up steps and `base` channels at full resolution.

    Parameters
    ----------
    in_channels : int
        4: DAPI, HER2, Ki67, Ki67-present flag.
    out_channels : int
        3: cell, centre, ki67 logits.
    base : int
        Channels of the first block; doubled at each step down.
    depth : int
        Number of 2x downsamplings.
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, base: int = 16, depth: int = 3):
        super().__init__()
        self.depth = depth
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.up.append(nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2))
            self.fuse.append(_block(2 * chans[i - 1], chans[i - 1]))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, fuse in zip(self.up, self.fuse, strict=True):
            x = up(x)
            x = fuse(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
