"""Scoped float64: the benchmark needs it, the rest of stepjax runs in float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


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


def callback_f64(fn, *arrays):
    """`jax.debug.callback(fn, *arrays, ordered=True)` that delivers float64 values intact.

    Debug callbacks may run on a thread where x64 is off, and the arguments are then
    rounded to float32 on their way to the host. Each array is therefore sent as its
    bit pattern (pairs of uint32) and reassembled on the host.

    **Arguments:**

    - `fn`: host function receiving float64 numpy arrays.
    - `arrays`: arrays or scalars (booleans arrive as 0.0 / 1.0).
    """
    packed = [jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float64), jnp.uint32) for a in arrays]

    def unpack(*words):
        fn(*(np.asarray(w).view(np.float64)[..., 0] for w in words))

    jax.debug.callback(unpack, *packed, ordered=True)
