"""On-device augmentation and normalisation (jittable, batched NHWC)."""

import jax
import jax.numpy as jnp


def _random_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def _random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def augment(images: jax.Array, key: jax.Array, *, padding: int = 4, flip: bool = True) -> jax.Array:
    """Per-example random crop with zero padding, then random horizontal flip.

    Apply it to raw pixels, before `normalize`, so that the padding is black as in the CIFAR
    protocol.

    **Arguments:**

    - `images`: `[N, H, W, C]`, uint8 or float.
    - `key`: a JAX PRNG key.
    - `padding`: zero padding on each side before cropping back to `H x W`; 0 disables cropping.
    - `flip`: whether to flip each image left-right with probability 1/2.

    **Returns:**

    The augmented images, same shape and dtype.
    """
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}.")
    crop_key, flip_key = jax.random.split(key)
    if padding:
        images = _random_crop(images, crop_key, padding)
    if flip:
        images = _random_flip(images, flip_key)
    return images


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """Scales uint8 pixels to `[0, 1]` and standardises each channel.

    **Arguments:**

    - `images`: uint8 `[..., C]`.
    - `mean`, `std`: `C` values for images in `[0, 1]` (e.g. `DATASETS['cifar10'].mean`).

    **Returns:**

    float32 `(images / 255 - mean) / std`.
    """
    scaled = jnp.asarray(images, jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
