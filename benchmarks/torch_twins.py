"""PyTorch twins of the Keras models, layer for layer, for the side-by-side benchmark.

Same layers, kernel sizes, channels, paddings and parameter counts as
``keras_livseg.models`` (the benchmark checks that the counts agree). The U-Net family
(``unet``, ``tam_unet``, ``attention_unet``, ``unet_cbam``) and ``effb0_pan`` are written
here; the ResNet and MiT models come from segmentation_models.pytorch (configured in
``bench_models.py``). Never imported by the package or its tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNET_VARIANTS = ("unet", "tam_unet", "attention_unet", "unet_cbam")


def count_params_like_keras(model: nn.Module) -> int:
    """Parameters plus BatchNorm moving statistics (Keras counts those as weights)."""
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in model.parameters()) + buffers


def count_used_params(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Parameter counts of the modules that one forward pass of ``sample`` runs.

    smp builds modules it never calls (``PSPNet(encoder_depth=3)`` creates ResNet
    stages 3-4 and skips them); Keras builds only what the graph uses, so the
    comparison counts what runs. Returns ``trainable`` (parameters), ``params``
    (those plus BatchNorm moving statistics, like Keras ``count_params()``) and
    ``params_all_modules`` (everything ``model.parameters()`` holds, statistics included).
    """
    ran: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda module, _: ran.append(module)) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    used = {id(m): m for m in ran}.values()
    trainable = sum(p.numel() for m in used for p in m.parameters(recurse=False))
    statistics = sum(
        b.numel() for m in used for n, b in m.named_buffers(recurse=False) if n in ("running_mean", "running_var")
    )
    return {"trainable": trainable, "params": trainable + statistics, "params_all_modules": count_params_like_keras(model)}


# ------------------------------------------------------------------ U-Net family


class TumorAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x))


class CBAM(nn.Module):
    """``keras_livseg.models.layers.CBAM``: shared MLP on avg/max pools, then a kxk spatial gate."""

    def __init__(self, channels: int, ratio: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        # The MLP runs twice, as in the Keras layer, rather than once on the stacked pools.
        channel = self.channel_mlp(x.mean((2, 3), keepdim=True)) + self.channel_mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(channel)
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_conv(maps))


class AttentionGate(nn.Module):
    """``keras_livseg.models.layers.AttentionGate``: ``x * sigmoid(psi(relu(W_x x + W_g g)))``, 1x1 convs."""

    def __init__(self, channels: int, gating_channels: int, inter_channels: int):
        super().__init__()
        self.skip_projection = nn.Conv2d(channels, inter_channels, 1, bias=False)
        self.gating_projection = nn.Conv2d(gating_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)

    def forward(self, skip, gating):
        joint = F.relu(self.skip_projection(skip) + self.gating_projection(gating))
        return skip * torch.sigmoid(self.psi(joint))


class UngatedSkip(nn.Module):
    def forward(self, skip, gating):
        return skip


def conv_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding="same"), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """``build_unet`` and its variants (no batch norm, nearest upsampling, 2x2 up-conv).

    ``variant`` is the registry name: ``"tam_unet"`` puts a TAM and ``"unet_cbam"`` a CBAM
    after every encoder block, the bottleneck and every decoder block;
    ``"attention_unet"`` gates every skip with the decoder's up-convolution output
    (``F_int = max(1, C // 2)``).
    """

    def __init__(self, in_channels=1, num_classes=3, filters=64, depth=4, variant="unet"):
        super().__init__()
        if variant not in UNET_VARIANTS:
            raise ValueError(f"variant must be one of {UNET_VARIANTS}, got variant={variant!r}.")
        attention = {"tam_unet": TumorAttention, "unet_cbam": CBAM}.get(variant, lambda c: nn.Identity())
        gated = variant == "attention_unet"
        self.depth = depth
        self.encoders, self.enc_attention = nn.ModuleList(), nn.ModuleList()
        cin = in_channels
        for level in range(depth):
            f = filters * 2**level
            self.encoders.append(nn.Sequential(conv_relu(cin, f, 3), conv_relu(f, f, 3)))
            self.enc_attention.append(attention(f))
            cin = f
        fb = filters * 2**depth
        self.bottleneck = nn.Sequential(conv_relu(cin, fb, 3), conv_relu(fb, fb, 3))
        self.bottleneck_attention = attention(fb)
        self.ups, self.gates = nn.ModuleList(), nn.ModuleList()
        self.decoders, self.dec_attention = nn.ModuleList(), nn.ModuleList()
        cin = fb
        for level in reversed(range(depth)):
            f = filters * 2**level
            self.ups.append(conv_relu(cin, f, 2))
            self.gates.append(AttentionGate(f, f, max(1, f // 2)) if gated else UngatedSkip())
            self.decoders.append(nn.Sequential(conv_relu(2 * f, f, 3), conv_relu(f, f, 3)))
            self.dec_attention.append(attention(f))
            cin = f
        self.logits = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x):
        skips = []
        for encoder, attend in zip(self.encoders, self.enc_attention):
            x = attend(encoder(x))
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck_attention(self.bottleneck(x))
        for up, gate, decoder, attend, skip in zip(
            self.ups, self.gates, self.decoders, self.dec_attention, reversed(skips)
        ):
            x = up(F.interpolate(x, scale_factor=2, mode="nearest"))
            x = attend(decoder(torch.cat([gate(skip, x), x], dim=1)))
        return self.logits(x)  # softmax lives in the loss


# ------------------------------------------------------------------ EfficientNet-B0


BLOCKS = [  # kernel, repeats, in, out, expand, stride (keras.applications DEFAULT_BLOCKS_ARGS)
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
]


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, expand, stride, drop):
        super().__init__()
        mid = cin * expand
        self.expand = (
            nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, eps=1e-3), nn.SiLU())
            if expand != 1
            else nn.Identity()
        )
        # keras: "same" for stride 1; correct_pad + "valid" for stride 2 (pads k//2-1 before, k//2 after).
        self.pad = (k // 2 - 1, k // 2, k // 2 - 1, k // 2) if stride == 2 else None
        self.dw = nn.Conv2d(mid, mid, k, stride, padding=0 if stride == 2 else k // 2, groups=mid, bias=False)
        self.bn = nn.Sequential(nn.BatchNorm2d(mid, eps=1e-3), nn.SiLU())
        se = max(1, int(cin * 0.25))
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, se, 1), nn.SiLU(), nn.Conv2d(se, mid, 1), nn.Sigmoid()
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3))
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x):
        y = self.expand(x)
        if self.pad is not None:
            y = F.pad(y, self.pad)
        y = self.bn(self.dw(y))
        y = self.project(y * self.se(y))
        if self.residual:
            if self.training and self.drop > 0:  # stochastic depth, as keras' Dropout(noise_shape=(None,1,1,1))
                keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop
                y = y * keep / (1 - self.drop)
            y = y + x
        return y


class EfficientNetB0Encoder(nn.Module):
    """Returns the pyramid at block2b_add, block3b_add, block5c_add, block7a_project_bn."""

    def __init__(self, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 2, bias=False), nn.BatchNorm2d(32, eps=1e-3), nn.SiLU()
        )
        total = sum(b[1] for b in BLOCKS)
        self.stages, index = nn.ModuleList(), 0
        for k, repeats, cin, cout, expand, stride in BLOCKS:
            blocks = []
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, expand, stride if j == 0 else 1,
                                     0.2 * index / total))
                index += 1
            self.stages.append(nn.Sequential(*blocks))

    def forward(self, x):
        x = self.stem(F.pad(x, (0, 1, 0, 1)))
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in (1, 2, 4, 6):
                features.append(x)
        return features


# ------------------------------------------------------------------ PAN decoder


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k=3, dilation=1, bn=True, relu=True):
        layers = [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout, eps=1e-3))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, c, ratio):
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(c, c // ratio, 1), nn.Conv2d(c // ratio, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(s))))


class ASPP(nn.Module):
    def __init__(self, cin, f, rates=(6, 12, 18), dropout=0.1):
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(cin, f, 1)] + [ConvBNReLU(cin, f, 3, r) for r in rates])
        self.pool_conv = nn.Conv2d(cin, f, 1)
        self.project = ConvBNReLU(f * (len(rates) + 2), f, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        pooled = F.relu(self.pool_conv(x.mean((2, 3), keepdim=True)))
        outs.append(pooled.expand_as(outs[0]))
        return self.dropout(self.project(torch.cat(outs, 1)))


class FPA(nn.Module):
    def __init__(self, c, f):
        super().__init__()
        self.mid = ConvBNReLU(c, f, 1)
        self.global_conv = nn.Conv2d(c, f, 1)
        self.down1, self.down2 = ConvBNReLU(c, 1, 7, bn=False), ConvBNReLU(1, 1, 5, bn=False)
        self.down3 = nn.Sequential(ConvBNReLU(1, 1, 3, bn=False), ConvBNReLU(1, 1, 3, bn=False))
        self.conv2, self.conv1 = ConvBNReLU(1, 1, 5, bn=False), ConvBNReLU(1, 1, 7, bn=False)

    @staticmethod
    def pool(x):
        return F.max_pool2d(x, 2, ceil_mode=True)

    def forward(self, x):
        mid = self.mid(x)
        g = F.relu(self.global_conv(x.mean((2, 3), keepdim=True)))
        x1 = self.down1(self.pool(x))
        x2 = self.down2(self.pool(x1))
        x3 = self.down3(self.pool(x2))
        y = self.conv2(x2) + F.interpolate(x3, size=x2.shape[2:], mode="bilinear")
        y = self.conv1(x1) + F.interpolate(y, size=x1.shape[2:], mode="bilinear")
        return F.interpolate(y, size=x.shape[2:], mode="bilinear") * mid + g


class GAU(nn.Module):
    def __init__(self, c_low, c_high, f):
        super().__init__()
        self.detail = ConvBNReLU(c_low, f, 3)
        self.attention = nn.Conv2d(f, f, 1)
        self.high_projection = ConvBNReLU(c_high, f, 1) if c_high != f else nn.Identity()

    def forward(self, low, high):
        high = self.high_projection(high)
        weights = torch.sigmoid(self.attention(high.mean((2, 3), keepdim=True)))
        return self.detail(low) * weights + F.interpolate(high, size=low.shape[2:], mode="bilinear")


class EffB0PAN(nn.Module):
    """``build_effb0_pan`` (decoder_filters, se_ratio, rates (6, 12, 18))."""

    def __init__(self, in_channels=1, num_classes=3, decoder_filters=64, se_ratio=4):
        super().__init__()
        f = decoder_filters
        self.encoder = EfficientNetB0Encoder(in_channels)
        self.se = nn.ModuleList([SqueezeExcitation(c, se_ratio) for c in (24, 40, 112)])
        self.aspp = ASPP(320, f)
        self.fpa = FPA(f, f)
        self.gau4, self.gau3, self.gau2 = GAU(112, f, f), GAU(40, f, f), GAU(24, f, f)
        self.logits = nn.Conv2d(f, num_classes, 1)

    def forward(self, x):
        p2, p3, p4, p5 = self.encoder(x)
        p2, p3, p4 = (se(p) for se, p in zip(self.se, (p2, p3, p4)))
        c5 = self.aspp(p5)
        d5 = c5 + self.fpa(c5)  # 1/32
        d4 = self.gau4(p4, d5)  # 1/16
        d3 = self.gau3(p3, d4)  # 1/8
        d2 = self.gau2(p2, d3)  # 1/4
        return F.interpolate(self.logits(d2), scale_factor=4, mode="bilinear")
