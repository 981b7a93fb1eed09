"""A linear solver for the implicit solves whose result does not depend on the machine's BLAS.

diffrax's implicit solvers factorise the Newton matrix with LAPACK (`jax.scipy.linalg.lu_factor`),
which on the CPU runs in the OpenBLAS bundled with SciPy. OpenBLAS picks its kernels for the CPU
it finds (or `OPENBLAS_CORETYPE`), and different kernels round differently: the same Kvaerno5
solve gives different low bits on different machines, and the imitation training, which feeds on
those solves round after round, then drifts apart. `PivotedLU` does the same partial-pivoting LU
and triangular solves in plain XLA operations without reductions (rank-one updates and axpys), so
every element is computed by the same sequence of operations on any CPU.
"""

from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from lineax.internal import pack_structures, ravel_vector, unravel_solution


def lu_factor(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LU factorisation with partial pivoting, ``a[perm] = L U``.

    **Arguments:** `a`: a square matrix.

    **Returns:** `(lu, perm)`: `L` (unit diagonal, not stored) below and `U` on and above the
    diagonal of `lu`, and the row permutation.
    """
    n = a.shape[0]
    index = jnp.arange(n)

    def eliminate(k, carry):
        lu, perm = carry
        pivot = jnp.argmax(jnp.where(index >= k, jnp.abs(lu[:, k]), -1.0))
        swap = jnp.where(index == k, pivot, jnp.where(index == pivot, k, index))
        lu, perm = lu[swap], perm[swap]
        below = index > k
        multipliers = jnp.where(below, lu[:, k] / lu[k, k], 0.0)
        lu = lu - multipliers[:, None] * jnp.where(below, lu[k], 0.0)[None, :]
        return lu.at[:, k].set(jnp.where(below, multipliers, lu[:, k])), perm

    return jax.lax.fori_loop(0, n, eliminate, (a, index))


def lu_solve(lu: jax.Array, perm: jax.Array, b: jax.Array) -> jax.Array:
    """Solve ``a x = b`` from `lu_factor(a)`, by column-oriented substitutions.

    **Returns:** `x`.
    """
    n = b.shape[0]
    index = jnp.arange(n)

    def forward(k, x):
        return x - jnp.where(index > k, lu[:, k], 0.0) * x[k]

    def backward(i, x):
        k = n - 1 - i
        xk = x[k] / lu[k, k]
        return jnp.where(index == k, xk, x - jnp.where(index < k, lu[:, k], 0.0) * xk)

    x = jax.lax.fori_loop(0, n, forward, b[perm])
    return jax.lax.fori_loop(0, n, backward, x)


class PivotedLU(lx.AbstractLinearSolver):
    """`lineax.LU` computed by `lu_factor` and `lu_solve` instead of LAPACK (square, nonsingular
    operators; forward solves only, which is all a Newton iteration needs)."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if operator.in_size() != operator.out_size():
            raise ValueError("PivotedLU needs a square operator.")
        return lu_factor(operator.as_matrix()), pack_structures(operator)

    def compute(self, state, vector, options: dict[str, Any]):
        del options
        (lu, perm), structures = state
        x = lu_solve(lu, perm, ravel_vector(vector, structures))
        return unravel_solution(x, structures), lx.RESULTS.successful, {}

    def transpose(self, state, options: dict[str, Any]):
        raise NotImplementedError("PivotedLU solves a x = b only; use lineax.LU for adjoint solves.")

    def conj(self, state, options: dict[str, Any]):
        raise NotImplementedError("PivotedLU solves real systems only; use lineax.LU.")

    def assume_full_rank(self) -> bool:
        return True
