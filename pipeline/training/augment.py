"""Training-batch augmentation for photos (`train.augment`): timm's RandomResizedCrop + horizontal flip.

Applied by `fit` to each training batch only — never when scoring, validating or evaluating —
as one batched `affine_grid` + `grid_sample` on the normalised batch, on whatever device it
lives on. The crop boxes follow torchvision/timm's ``RandomResizedCrop.get_params`` (scale
(0.08, 1), ratio (3/4, 4/3), 10 attempts, then the centre crop clamped to the ratio range);
the output keeps the input size, flips have probability 0.5. Every random number comes
from the training generator (the permutations' one), drawn for the whole global batch on
every rank, so runs are seeded, resume bit-identically, and DDP ranks stay in step.

``auto`` turns it on for images of at least 64 px with 3 channels (photos) and off for small
grayscale sets (digits, Fashion-MNIST), whose results then do not change.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.distributed import even_split

#: the crop scale and aspect-ratio ranges of timm's train transforms (RandomResizedCropAndInterpolation)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
#: `auto` augments images at least this many pixels on their shorter side (with 3 channels)
AUTO_MIN_SIDE = 64


def resolve(setting: str, in_chans: int, hw: tuple[int, int]) -> bool:
    """Whether `train.augment` = `setting` (auto | none | flip-crop) augments images [C=in_chans, H, W]."""
    if setting == "auto":
        return in_chans == 3 and min(hw) >= AUTO_MIN_SIDE
    return setting == "flip-crop"


def draw(gen, n: int, h: int, w: int):
    """Crop box and flip of `n` samples from torch generator `gen` → float64 tensor [n, 5]:
    (top, left, height, width, flip) in pixels (flip 0 or 1)."""
    import torch

    u = torch.rand((n, ATTEMPTS, 4), generator=gen, dtype=torch.float64)
    flip = (torch.rand(n, generator=gen, dtype=torch.float64) < 0.5).double()
    area = h * w
    target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[..., 0])
    lr = (math.log(RATIO[0]), math.log(RATIO[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = torch.floor(u[..., 2] * (h - ch + 1))
    left = torch.floor(u[..., 3] * (w - cw + 1))
    first = torch.argmax(ok.int(), dim=1)  # the first valid attempt (0 when none: replaced below)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    box = torch.stack([pick(top), pick(left), pick(ch), pick(cw)], 1)
    # fallback (no valid attempt): the centre crop with the aspect ratio clamped to RATIO
    in_ratio = w / h
    if in_ratio < RATIO[0]:
        fw, fh = w, round(w / RATIO[0])
    elif in_ratio > RATIO[1]:
        fh, fw = h, round(h * RATIO[1])
    else:
        fw, fh = w, h
    fallback = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=torch.float64)
    box = torch.where(ok.any(1)[:, None], box, fallback)
    return torch.cat([box, flip[:, None]], 1)


def batch_params(gen, size: int, h: int, w: int, world: int = 1, rank: int = 0):
    """`draw` for a global batch of `size` samples, then this rank's contiguous part (the
    slice `fit` trains on; its first sample for a rank left without any)."""
    p = draw(gen, size, h, w)
    if world == 1:
        return p

    a, b = even_split(size, world, rank)
    return p[a:b] if b > a else p[:1]


def apply(x, params):
    """Crop each image of the float batch x [B, C, H, W] to its box, resize it back to H x W
    (bilinear) and flip it where asked; `params` from `draw` (any device)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    p = params.to(device=x.device, dtype=torch.float64)
    top, left, ch, cw, flip = p.unbind(1)
    theta = torch.zeros((b, 2, 3), dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = cw / w * (1 - 2 * flip)   # output x in [-1, 1] → the crop's columns (mirrored on flip)
    theta[:, 0, 2] = 2 * (left + cw / 2) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = 2 * (top + ch / 2) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    # sample only inside the box (as resizing the cropped image does): clamp to its outer pixel centres
    lo = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], 1)[:, None, None, :]
    hi = torch.stack([(2 * (left + cw) - 1) / w - 1, (2 * (top + ch) - 1) / h - 1], 1)[:, None, None, :]
    grid = torch.maximum(torch.minimum(grid, hi), lo).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if nhwc else out


def crop_flip_reference(img: np.ndarray, box) -> np.ndarray:
    """The same crop + resize + flip of one [C, H, W] float image with torchvision (tests)."""
    import torch
    from torchvision.transforms.functional import InterpolationMode, hflip, resized_crop

    top, left, ch, cw, flip = (float(v) for v in box)
    t = resized_crop(torch.as_tensor(img), int(top), int(left), int(ch), int(cw), list(img.shape[1:]),
                     interpolation=InterpolationMode.BILINEAR, antialias=False)
    return (hflip(t) if flip else t).numpy()
