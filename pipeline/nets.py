"""Small CNNs for small images, registered into timm's model registry.

This module does not import timm (whose import costs ~2 s): `pipeline.models.create_model`
builds these nets directly, and calls :func:`register_with_timm` before it needs timm for any
other name (so `timm.create_model("small_cnn")` and `timm.list_models()` know them too).
Every net follows timm's API: `forward_features`, `forward_head(x, pre_logits=False)`,
`get_classifier()`, `reset_classifier()`, `num_classes`, `num_features`.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """2 conv + 2 fc net in the spirit of the classic MNIST CNN (Vodrahalli et al.'s net).

    conv3x3(32) → [BN] → ReLU → maxpool2 → conv3x3(64) → [BN] → ReLU → maxpool2 →
    flatten → fc(hidden) → ReLU → dropout → fc(num_classes).
    Input [B, in_chans, H, W]; H, W ≥ 4 (given as `img_size` so the fc size is known).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size=28,
                 hidden: int = 128, batch_norm: bool = False, drop_rate: float = 0.25, **_):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h < 4 or w < 4:
            raise ValueError(f"small_cnn needs images of at least 4x4, got {h}x{w}")
        self.num_classes = num_classes
        self.num_features = hidden
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), norm(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 64 * (h // 4) * (w // 4)
        self.fc1 = nn.Linear(flat, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, *_, **__) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set model.pretrained: false")


def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """2-conv + 2-fc CNN for small images (digits, MNIST-like 28×28)."""
    _no_pretrained("small_cnn", pretrained)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg")}
    return SmallCNN(batch_norm=False, **kwargs)


def small_cnn_bn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """small_cnn with BatchNorm after each conv."""
    _no_pretrained("small_cnn_bn", pretrained)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg")}
    return SmallCNN(batch_norm=True, **kwargs)


#: name → builder(pretrained=False, num_classes=, in_chans=, img_size=)
BUILDERS = {"small_cnn": small_cnn, "small_cnn_bn": small_cnn_bn}
SMALL_NETS = set(BUILDERS)


def register_with_timm() -> None:
    """Register the small nets into timm's model registry (imports timm; idempotent)."""
    import timm
    from timm.models import register_model

    for name, fn in BUILDERS.items():
        if not timm.is_model(name):
            register_model(fn)
