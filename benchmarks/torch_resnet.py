"""The comparison network in PyTorch: CIFAR ResNet-164, post-activation bottleneck blocks.

Same architecture as `stepjax.models.make_model("resnet164")` with the constant controller
(conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, projection shortcut conv1x1+BN on the
first block of a stage that changes shape, ReLU after the add), the same step: random crop
(padding 4) and flip, normalisation, forward, cross-entropy, backward, SGD (momentum 0.9,
weight decay 1e-4). Optional dependency: ``pip install torch==2.13.0`` (CPU build).
"""

from __future__ import annotations

import time

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def _build(depths, block="bottleneck", num_classes=10):
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            out = 4 * planes
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
            self.shortcut = None
            if stride != 1 or cin != out:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            f = torch.relu(self.bn1(self.conv1(x)))
            f = torch.relu(self.bn2(self.conv2(f)))
            f = self.bn3(self.conv3(f))
            return torch.relu((x if self.shortcut is None else self.shortcut(x)) + f)

    class Basic(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = None
            if stride != 1 or cin != planes:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            f = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu((x if self.shortcut is None else self.shortcut(x)) + f)

    cls, expansion = (Bottleneck, 4) if block == "bottleneck" else (Basic, 1)
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for depth, planes, stride in zip(depths, (16, 32, 64), (1, 2, 2)):
        for i in range(depth):
            layers.append(cls(cin, planes, stride if i == 0 else 1))
            cin = expansion * planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# the PyTorch rows of the same-time comparison (benchmarks.workers.worker_interleaved)
TORCH_RUNS = {
    "pytorch resnet164": {"depths": (18, 18, 18), "batch": 128},
    "pytorch resnet164 (torch.compile)": {"depths": (18, 18, 18), "batch": 128, "compile": True},
    "pytorch resnet20 (batch 32)": {"depths": (3, 3, 3), "block": "basic", "batch": 32},
}


def make_torch_step(*, depths=(18, 18, 18), block="bottleneck", batch=128, channels_last=True, compile=False, seed=0):
    """A function that runs one training step of the PyTorch ResNet (`block`: ``"bottleneck"``
    for ResNet-164, ``"basic"`` for ResNet-20) and returns the loss; `compile`: the model under
    `torch.compile` (inductor, compiled on the first two calls)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = _build(depths, block)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, (batch,), dtype=np.int64))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    rows = torch.arange(32).view(1, 32, 1)
    cols = torch.arange(32).view(1, 1, 32)
    batch_index = torch.arange(batch).view(batch, 1, 1)

    def step():
        x = images.permute(0, 3, 1, 2).float()
        padded = F.pad(x, (4, 4, 4, 4))
        off = torch.randint(0, 9, (batch, 2))
        r = rows + off[:, 0].view(batch, 1, 1)
        c = cols + off[:, 1].view(batch, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch_index, r, c].permute(0, 3, 1, 2)
        flip = torch.rand(batch) < 0.5
        x = torch.where(flip.view(batch, 1, 1, 1), x.flip(3), x)
        x = ((x / 255.0 - mean) / std).contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), labels)
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    return step


def time_torch_step(*, depths=(18, 18, 18), batch=128, warmup=2, repeats=5, channels_last=True,
                    reset_peak=None, seed=0):
    """Median time of one training step of the PyTorch ResNet on the CPU.

    **Returns:**

    A dict with ``step_s``, ``step_times_s``, ``images_per_s``, ``losses``, ``threads`` and the
    torch version.
    """
    import torch

    step = make_torch_step(depths=depths, batch=batch, channels_last=channels_last, seed=seed)
    losses = [step() for _ in range(warmup)]
    if reset_peak is not None:
        reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    times_sorted = sorted(times)
    median = times_sorted[len(times) // 2] if len(times) % 2 else 0.5 * (times_sorted[len(times) // 2 - 1] + times_sorted[len(times) // 2])
    return {"step_s": median, "step_times_s": times, "images_per_s": batch / median, "losses": losses,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "channels_last": channels_last,
            "batch": batch, "depths": list(depths)}
