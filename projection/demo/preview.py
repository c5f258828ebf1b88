"""Pictures of latents without a VAE: Wan 2.1's linear latent-to-RGB preview (what ComfyUI shows while sampling).

Wan 2.1 latents have 16 channels; the model sees them normalized, (latent - LATENTS_MEAN) / LATENTS_STD. The
preview undoes that and maps each pixel linearly: rgb = latent @ RGB_FACTORS + RGB_BIAS, roughly in [-1, 1]. The
numbers are ComfyUI's (`comfy/latent_formats.py`, class Wan21). It is a preview, not a decode: colours and
coarse layout, at the latent's resolution. The demo's 4-channel latents decode exactly instead (`digits.decode`).
"""
from __future__ import annotations

import torch

from ..errors import ProjectionError

LATENTS_MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
LATENTS_STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])
RGB_FACTORS = torch.tensor([  # [16, 3]: one (r, g, b) row per latent channel
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861]])
RGB_BIAS = torch.tensor([-0.1835, -0.0868, -0.3360])


def wan21_rgb_preview(latents: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Latents [N, 16, H, W] (normalized as the model sees them, unless normalized=False) -> RGB [N, 3, H, W],
    roughly in [-1, 1] (not clipped)."""
    if latents.dim() != 4 or latents.shape[1] != len(RGB_FACTORS):
        raise ProjectionError(f"the Wan 2.1 preview needs latents [N, 16, H, W], got {list(latents.shape)}")
    x = latents.float().cpu()
    if normalized:
        x = x * LATENTS_STD[:, None, None] + LATENTS_MEAN[:, None, None]
    return torch.einsum("nchw,cr->nrhw", x, RGB_FACTORS) + RGB_BIAS[:, None, None]
