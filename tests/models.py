"""Hand-written ResNets in the styles users write them, for the fuse() tests."""

import torch
import torch.nn.functional as F
from torch import nn


# --- CIFAR style (kuangliu/pytorch-cifar): `shortcut`, empty Sequential as identity, F.relu,
#     `out += self.shortcut(x)`, 3x3 stride-1 stem, no maxpool, view + linear. -----------------
class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2), widths=(16, 32, 64), num_classes=10, in_channels=3):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            layers.append(self._make_layer(w, n, 1 if i == 0 else 2))
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_layer(self, planes, n, stride):
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


# --- Bottleneck style with its own habits: conv1x1 helper for the shortcut, stem as one
#     Sequential(conv, BN, ReLU, maxpool), `out = out + identity`, torch.relu, x.relu_(),
#     inplace ReLU modules, fc as Sequential(Flatten, Linear), forward -> _forward_impl. --------
def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


class HandBottleneck(nn.Module):
    def __init__(self, cin, width, cout, stride=1, groups=1):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)).relu_()
        out = self.bn3(self.conv3(out))
        out = out + identity
        return torch.relu(out)


class HandResNet(nn.Module):
    def __init__(self, groups=1, width_mult=1, num_classes=7, fc=True):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        w = 16 * width_mult * (2 if groups > 1 else 1)  # ResNeXt widens its grouped 3x3s
        self.stages = nn.Sequential(
            HandBottleneck(32, w, 64, 1, groups),
            HandBottleneck(64, w, 64, 1, groups),
            HandBottleneck(64, 2 * w, 128, 2, groups),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128, num_classes)) if fc else None

    def _forward_impl(self, x):
        x = self.stem(x)
        x = self.stages(x)
        if self.fc is None:
            return x
        return self.fc(self.pool(x))

    def forward(self, x):
        return self._forward_impl(x)


# --- Functional in-place ReLU, no fc (a backbone returning feature maps), torch.add. ---------
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, 1, 1)  # with a conv bias
        self.bn = nn.BatchNorm2d(24, affine=False)  # non-affine BN
        self.block_a = nn.Conv2d(24, 24, 3, 1, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(24)
        self.block_b = nn.Conv2d(24, 24, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(24)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        y = torch.relu_(self.bn_a(self.block_a(x)))
        y = self.bn_b(self.block_b(y))
        return F.relu(torch.add(x, y), inplace=True)


# --- Not traceable as a whole: data-dependent control flow at the top. ---------------------
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = CifarResNet(num_blocks=(1, 1), widths=(8, 16))
        self.alt = nn.Identity()

    def forward(self, x):
        if x.sum() > -1e30:  # always true, but fx cannot know
            return self.body(x)
        return self.alt(x)


# --- Things that must be left alone, and stay right. -----------------------------------------
class Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn_batchstats = nn.BatchNorm2d(8, track_running_stats=False)  # normalises by batch
        self.conv_b = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_reflect = nn.Conv2d(8, 8, 3, 1, 1, bias=False, padding_mode="reflect")
        self.bn_r = nn.BatchNorm2d(8)
        self.conv_silu = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_s = nn.BatchNorm2d(8)
        self.silu = nn.SiLU()

    def forward(self, x):
        x = torch.relu(self.bn_batchstats(self.conv_a(x)))
        b = self.conv_b(x)
        y = self.bn_b(b) + b  # conv output used twice: the BN cannot be folded into it
        y = torch.relu(self.bn_r(self.conv_reflect(y)))
        return self.silu(self.bn_s(self.conv_silu(y)))
