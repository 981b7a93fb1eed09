"""Scoped float64: the benchmark needs it, the rest of stepjax runs in float32."""

import functools

import jax


def x64(fn):
    """Run `fn` with `jax_enable_x64` switched on, restoring the previous setting.

    **Arguments:**

    - `fn`: any callable.

    **Returns:**

    The wrapped callable.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped
