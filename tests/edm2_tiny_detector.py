"""An offline stand-in for Inception-v3 in the EDM2 evaluation tests: a fixed random projection of pixels."""

import torch


class TinyDetector:
    feature_dim = 8

    def __init__(self):
        self.proj = torch.randn([3 * 8 * 8, self.feature_dim], generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, images):  # uint8 NCHW, 8x8 RGB -> [N, 8]
        return (images.to(torch.float64).flatten(1) / 255) @ self.proj.to(images.device)
