"""Host-side decoding of variable-size images (ImageNet) to a fixed square size.

Training: a random crop covering 8-100 % of the area with aspect ratio in [3/4, 4/3] (the
"random resized crop" of Szegedy et al.), resized to `size`. Evaluation: the centre crop that
"resize the shorter side to 256, take the central 224" selects, resized to `size`. Flips are left
to `augment` on the device.
"""

import math

import numpy as np
from PIL import Image

_AREA = (0.08, 1.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_EVAL_FRACTION = 224 / 256
_ATTEMPTS = 10


def _random_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    for _ in range(_ATTEMPTS):
        area = height * width * rng.uniform(*_AREA)
        ratio = math.exp(rng.uniform(*_LOG_RATIO))
        h = round(math.sqrt(area / ratio))
        w = round(math.sqrt(area * ratio))
        if 0 < h <= height and 0 < w <= width:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    return _centre_box(height, width)


def _centre_box(height: int, width: int) -> tuple[int, int, int, int]:
    side = max(1, round(min(height, width) * _EVAL_FRACTION))
    return (height - side) // 2, (width - side) // 2, side, side


def decode(image: np.ndarray, rng: np.random.Generator | None, size: int) -> np.ndarray:
    """Crops and resizes one image to `size x size`.

    **Arguments:**

    - `image`: uint8 `[H, W, 3]` of any height and width.
    - `rng`: a numpy generator for a random training crop, or `None` for the evaluation crop.
    - `size`: output height and width.

    **Returns:**

    uint8 `[size, size, 3]`.
    """
    height, width = image.shape[:2]
    top, left, h, w = _centre_box(height, width) if rng is None else _random_box(height, width, rng)
    crop = Image.fromarray(image[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))
