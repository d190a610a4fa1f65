"""Kalman forward filtering, backward sampling for the keypoint SLDS (model spec 4.2, 4.4).

Both samplers act on ONE segment; vmap them over segments. Each takes all of its
randomness from a single ``uniforms`` draw.

``sample_latent_x`` lifts the AR(L) latent trajectory to the first-order state
X_t' = [x_t'; ...; x_{t'+L-1}] (A = L*P). Only the newest block is observed and
the observation noise is diagonal, so each frame's emission is first reduced,
vectorised over all frames before any scan, to an equivalent P-dimensional
pseudo-observation with unit noise (square-root information form, spec 13):

    J_t = Ctil^T diag(1/r_t) Ctil = R_t^T R_t          (R_t upper triangular, P x P)
    w_t = R_t^{-T} Ctil^T diag(1/r_t) (ytil_t - dtil)  ~  N(R_t x_t, I_P)

which carries the same likelihood of x_t up to a constant that is kept for the
log-normaliser. A filter step then costs O(A^2 P + P^3) and never forms an
O x O matrix.

Implementation notes (CPU, jax 0.10):

- No LAPACK custom calls. In jaxlib 0.10.2 two batched LAPACK calls (potrf,
  trsm, ...) that XLA runs concurrently can deadlock the CPU thread pool
  (observed here with gdb: both ``tf_XLAEigen`` workers blocked in
  ``ParallelBatchMap``). P x P Cholesky factors and their inverses are unrolled
  entry by entry; A x A ones are blocked by P over those.
- No ``dot`` on small batched matrices: XLA CPU runs them one tiny matrix at a
  time (and far slower still with a transposed operand). Products are written as
  unrolled sums of broadcast products (``_mm``), which XLA fuses.
- Filter state is the augmented matrix [Cov | mean] (A, A+1), so the covariance
  and the mean share every product.
- Filtered and predicted moments are emitted by the forward scan (F Cov is rebuilt
  from the filtered ones: all but its newest row block are slices of Cov); backward
  gains and backward-conditional factors are then computed for many steps at once, and
  the backward pass is the affine recursion X_t' = E_t' X_{t'+1} + g_t', run by
  ``lax.scan`` (serial) or ``lax.associative_scan`` (parallel).
- The per-step backward arrays are (n, A, A); once they outgrow the CPU caches
  (a segment of ~5000 frames at A = 12) memory traffic dominates: the serial
  sampler therefore computes them in blocks of ``BACKWARD_BLOCK`` steps, each
  followed by its part of the recursion, and segments are mapped in small chunks
  (``lax.map``, one segment or a few at a time, spec 12.4) rather than vmapped all at once.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .distributions import normal_from_uniform, uniforms

#: Transition noise on the copied lag blocks of the lifted state (spec 4.2).
COPY_NOISE = 0.01
#: Variance used for padded frames: emission noise and the padded-source transition noise.
PAD_VARIANCE = 10.0
#: Prior variance of every coordinate of X_0 (spec 4.2).
PRIOR_VARIANCE = 10.0


# --------------------------------------------------------------------------- #
# Small dense linear algebra: fused products, LAPACK-free factorisations
# --------------------------------------------------------------------------- #
def _t(mat):
    return jnp.swapaxes(mat, -1, -2)


def _sym(mat):
    return 0.5 * (mat + _t(mat))


def _keep(tree):
    """Materialise ``tree``: stops XLA from fusing (and so recomputing) a large
    unrolled product into each of its consumers."""
    return jax.lax.optimization_barrier(tree)


def _total(terms):
    """The sum of an iterable of arrays (no leading ``0 +`` as in the built-in ``sum``)."""
    return functools.reduce(operator.add, terms)


def _col(a, k):
    """Column k of the matrices ``a`` (..., n, m), kept as (..., n, 1): one static slice."""
    return jax.lax.slice_in_dim(a, k, k + 1, axis=a.ndim - 1)


def _row(a, k):
    """Row k of the matrices ``a`` (..., n, m), kept as (..., 1, m)."""
    return jax.lax.slice_in_dim(a, k, k + 1, axis=a.ndim - 2)


# The products below index with kept-dimension slices (``_col``, ``_row``): integer indexing
# followed by ``None`` traces three operations per operand instead of one, and these unrolled
# sums make up most of the sampler's traced program (its tracing and lowering time).
def _mm(a, b):
    """a @ b over the last two axes as an unrolled sum of broadcast products."""
    return _total(_col(a, k) * _row(b, k) for k in range(a.shape[-1]))


def _mm_tn(a, b):
    """a^T @ b over the last two axes."""
    return _total(_t(_row(a, k)) * _row(b, k) for k in range(a.shape[-2]))


def _mm_nt(a, b):
    """a @ b^T over the last two axes."""
    return _total(_col(a, k) * _t(_col(b, k)) for k in range(a.shape[-1]))


def _mv(a, x):
    """a @ x for matrices a (..., n, k) and vectors x (..., k)."""
    vec = x[..., None, :]  # (..., 1, k)
    return _total(_col(a, k) * _col(vec, k) for k in range(a.shape[-1]))[..., 0]


def _chol_inv_small(mat):
    """Lower Cholesky factor L of SPD ``mat`` (..., n, n) and L^{-1}, unrolled entry by entry.

    Meant for small n (the latent dimension): a chain of elementwise operations
    that XLA fuses.
    """
    n = mat.shape[-1]
    low = [[None] * n for _ in range(n)]
    for j in range(n):
        diag = mat[..., j, j]
        for k in range(j):
            diag = diag - low[j][k] ** 2
        low[j][j] = jnp.sqrt(diag)
        for i in range(j + 1, n):
            off = mat[..., i, j]
            for k in range(j):
                off = off - low[i][k] * low[j][k]
            low[i][j] = off / low[j][j]
    inv = [[None] * n for _ in range(n)]
    for i in range(n):
        inv[i][i] = 1.0 / low[i][i]
        for j in range(i - 1, -1, -1):
            acc = low[i][j] * inv[j][j]
            for k in range(j + 1, i):
                acc = acc + low[i][k] * inv[k][j]
            inv[i][j] = -acc * inv[i][i]
    zero = jnp.zeros_like(mat[..., 0, 0])

    def stack(rows):
        return jnp.stack([jnp.stack([zero if e is None else e for e in row], -1) for row in rows], -2)

    return _keep((stack(low), stack(inv)))


def _block_cholesky(mat, size):
    """Lower Cholesky factor of SPD ``mat`` (..., n, n), n a multiple of ``size``, by blocks.

    Returns the factor as its block columns, ``[(diag_k, below_k), ...]`` with the
    diagonal block L_kk (..., size, size) and the blocks under it stacked,
    (..., n - (k+1) size, size): the zero blocks above the diagonal are never
    formed. Also returns the inverses of the diagonal blocks (for ``_block_solve``).
    """
    n = mat.shape[-1]
    cols, invs, rest = [], [], mat
    for _ in range(n // size):
        diag, inv = _chol_inv_small(rest[..., :size, :size])
        below = _mm_nt(rest[..., size:, :size], inv)
        rest = rest[..., size:, size:] - _mm_nt(below, below)
        cols.append((diag, below))
        invs.append(inv)
    return cols, invs


def _factor_block(cols, row, col):
    """Block (row, col), row > col, of a factor from ``_block_cholesky``."""
    size = cols[col][0].shape[-1]
    return cols[col][1][..., (row - col - 1) * size : (row - col) * size, :]


def _block_solve(cols, invs, rhs):
    """Solve L X = rhs by block forward substitution, with a factor from ``_block_cholesky``;
    ``rhs`` and the returned X are lists of row blocks ((..., size, m) arrays)."""
    sol = []
    for k, inv in enumerate(invs):
        r = rhs[k]
        for j in range(k):
            r = r - _mm(_factor_block(cols, k, j), sol[j])
        sol.append(_mm(inv, r))
    return sol


def _block_mv(cols, x):
    """L x for a factor from ``_block_cholesky`` and vectors x (..., n)."""
    size = cols[0][0].shape[-1]
    out = []
    for k, (diag, _) in enumerate(cols):
        acc = _mv(diag, x[..., k * size : (k + 1) * size])
        for j in range(k):
            acc = acc + _mv(_factor_block(cols, k, j), x[..., j * size : (j + 1) * size])
        out.append(acc)
    return jnp.concatenate(out, axis=-1)


def _cholesky_rolled(mat):
    """Lower Cholesky factor by a ``fori_loop`` over columns (compiles to a small loop;
    used inside the associative scan, whose operator is traced once per level)."""
    n = mat.shape[-1]
    idx = jnp.arange(n)

    def body(j, carry):
        rest, low = carry
        col = jax.lax.dynamic_index_in_dim(rest, j, axis=-1, keepdims=False)
        piv = jnp.sqrt(jax.lax.dynamic_index_in_dim(col, j, axis=-1, keepdims=False))
        col = jnp.where(idx >= j, col / piv[..., None], 0.0)
        return rest - col[..., :, None] * col[..., None, :], low + col[..., :, None] * (idx == j)

    return jax.lax.fori_loop(0, n, body, (mat, jnp.zeros_like(mat)))[1]


def _solve_lower_rolled(low, rhs):
    """Solve L X = rhs by forward substitution in a ``fori_loop`` over rows."""
    n = low.shape[-1]

    def body(i, sol):
        row = jax.lax.dynamic_index_in_dim(low, i, axis=-2, keepdims=False)  # (..., n)
        r = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False) - _mv(_t(sol), row)
        r = r / jax.lax.dynamic_index_in_dim(row, i, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(sol, r, i, axis=-2)

    return jax.lax.fori_loop(0, n, body, jnp.zeros_like(rhs))


# --------------------------------------------------------------------------- #
# Model pieces
# --------------------------------------------------------------------------- #
class _Steps(NamedTuple):
    """Lifted transitions X_{t'+1} = F X_t' + [0; b] + N(0, blockdiag(copy_var I, Q)), t' = 0..N-1.

    F = [[shift * I_shifted], [A_row]]: ``shift`` is 1 (or 0 when the source frame
    is padding), ``A_row`` (P, A) is A_k (or [0 ... 0 I_P]). See ``_lifted_steps``
    for the terminal step t' = N-1.
    """

    shift: jax.Array  # (N,)
    A_row: jax.Array  # (N, P, A)
    b: jax.Array  # (N, P)
    Q: jax.Array  # (N, P, P) noise on the newest block
    copy_var: jax.Array  # (N,) noise variance on the copied blocks


class _PseudoObs(NamedTuple):
    """Per-frame whitened emission w = R x + N(0, I_P); log p(y | x) = -|w - R x|^2 / 2 + const."""

    R: jax.Array  # (T, P, P) upper triangular
    w: jax.Array  # (T, P)
    const: jax.Array  # (T,)


def _pseudo_observations(ytil, obs_var, Ctil, dtil) -> _PseudoObs:
    """Square-root information form of ytil_t ~ N(Ctil x_t + dtil, diag(obs_var_t)), all frames at once.

    J_t gets ``eps * trace(J_t)`` added on its diagonal (a relative perturbation at
    rounding level) so that its Cholesky factor exists even if Ctil loses rank.
    """
    dtype = ytil.dtype
    latent_dim = Ctil.shape[-1]
    prec = 1.0 / obs_var
    resid = ytil - dtil
    outer = (Ctil[:, :, None] * Ctil[:, None, :]).reshape(Ctil.shape[0], -1)
    info = (prec @ outer).reshape(-1, latent_dim, latent_dim)  # J_t
    ridge = jnp.finfo(dtype).eps * jnp.trace(info, axis1=-2, axis2=-1)
    info = info + ridge[:, None, None] * jnp.eye(latent_dim, dtype=dtype)
    low, low_inv = _chol_inv_small(info)
    w = _mv(low_inv, (resid * prec) @ Ctil)  # L^{-1} Ctil^T diag(1/r) (y - d)
    quad = jnp.sum(resid**2 * prec, axis=-1)
    const = -0.5 * (quad - jnp.sum(w**2, axis=-1)) - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * obs_var), axis=-1)
    return _PseudoObs(_t(low), w, const)


def _lifted_steps(Ab, Q, z, mask, n_lags) -> _Steps:
    """Per-step transition pieces for t' = 0..N-1 (spec 4.2).

    Steps 0..N-2 are the model's transitions, with the padded-source rule
    F = blockdiag(0, I_P), b = 0, cov = 10 I when frame tau = t'+L-1 is padding.
    Step N-1 is a terminal one that no data follow (F = 0, b = 0, cov = I): it
    makes the last backward gain exactly 0 and the last backward-conditional
    covariance the filtered one, so every per-step array has length N.
    """
    dtype = Ab.dtype
    latent_dim, lifted = Ab.shape[1], Ab.shape[2] - 1
    real = jnp.append(mask[n_lags - 1 : -1] > 0, False)  # source frame tau = t' + L - 1 of each step
    last = jnp.arange(real.shape[0]) == real.shape[0] - 1
    labels = jnp.append(z, 0)
    Ab_t = Ab[labels]
    eye = jnp.eye(latent_dim, dtype=dtype)
    newest_only = jnp.where(last[:, None, None], 0.0, jnp.eye(latent_dim, lifted, lifted - latent_dim, dtype=dtype))
    return _Steps(
        shift=real.astype(dtype),
        A_row=jnp.where(real[:, None, None], Ab_t[:, :, :lifted], newest_only),
        b=jnp.where(real[:, None], Ab_t[:, :, lifted], 0.0),
        Q=jnp.where(real[:, None, None], Q[labels], jnp.where(last[:, None, None], eye, PAD_VARIANCE * eye)),
        copy_var=jnp.where(real, COPY_NOISE, jnp.where(last, 1.0, PAD_VARIANCE)).astype(dtype),
    )


def _transition_noise(step: _Steps) -> jax.Array:
    """blockdiag(copy_var I_{A-P}, Q) for one step, (A, A)."""
    latent_dim = step.Q.shape[-1]
    pad = step.A_row.shape[-1] - latent_dim
    copies = jnp.concatenate([jnp.ones(pad, step.Q.dtype), jnp.zeros(latent_dim, step.Q.dtype)])
    return jnp.diag(step.copy_var * copies) + jnp.pad(step.Q, ((pad, 0), (pad, 0)))


def _apply_F(step: _Steps, mat: jax.Array) -> jax.Array:
    """F @ mat for one step, mat (A, k), without forming F."""
    latent_dim = step.Q.shape[-1]
    return jnp.concatenate([step.shift * mat[latent_dim:], _mm(step.A_row, mat)], axis=0)


def _predict(step: _Steps, filt):
    """From the filtered [Cov | mean] of X_t' (A, A+1): F [Cov | mean] and the
    predicted [Cov^- | mean^-] of X_{t'+1}."""
    latent_dim = step.Q.shape[-1]
    lifted = filt.shape[0]
    f_filt = _apply_F(step, filt)
    f_cov = f_filt[:, :lifted]
    pred_cov = jnp.concatenate([step.shift * f_cov[:, latent_dim:], _mm_nt(f_cov, step.A_row)], axis=1)
    pred_cov = _sym(pred_cov + _transition_noise(step))
    pred_mean = f_filt[:, lifted] + jnp.concatenate([jnp.zeros(lifted - latent_dim, filt.dtype), step.b])
    return f_filt, jnp.concatenate([pred_cov, pred_mean[:, None]], axis=1)


def _update(obs_R, obs_w, obs_const, pred):
    """Condition [Cov | mean] (A, A+1) on the newest block's pseudo-observation w = R x + N(0, I).

    The P rows of w are independent unit-variance scalar observations, so they are
    absorbed one at a time (the same posterior and the same predictive density by
    the chain rule): with r the row's coefficients on the newest block,
    v = Cov r^T, s = r Cov_new r^T + 1 >= 1 and e = w_j - r mean_new,
    [Cov | mean] += v [-v^T | e] / s and log p += -(e^2 / s + log s) / 2.
    Returns the filtered [Cov | mean] and log p(ytil_tau | past) = log N(w; R mean_new,
    R Cov_new R^T + I) + (P/2) log 2 pi + const.

    Each row is one fused kernel and no factorisation is needed: XLA:CPU runs a filter
    step as 16 kernels this way, against 18 with a Gauss-Jordan elimination of the
    P x P innovation covariance (a dependent chain of one kernel per pivot) and 23
    with its Cholesky factor (one scalar kernel per factor entry); the filter runs
    17-20% faster than with the elimination at P = 4, L = 3 (docs/notes.md).
    """
    latent_dim = obs_R.shape[-1]
    lifted = pred.shape[0]
    newest = pred[lifted - latent_dim :]  # rows of [Cov | mean] for the newest block, (P, A+1)
    filt, log_pred = pred, obs_const
    for j in range(latent_dim):
        row = obs_R[j]
        v = sum(row[k] * newest[k] for k in range(latent_dim))  # [Cov r^T | r mean_new], (A+1,)
        s = sum(v[lifted - latent_dim + k] * row[k] for k in range(latent_dim)) + 1.0  # no reduce: fuses
        e = obs_w[j] - v[lifted]
        filt = filt + v[:lifted, None] * jnp.concatenate([-v[:lifted], e[None]])[None, :] / s
        newest = filt[lifted - latent_dim :]
        log_pred = log_pred - 0.5 * (e * e / s + jnp.log(s))
    return filt, log_pred


def _initial_state(obs: _PseudoObs, n_lags, latent_dim, dtype):
    """Filtered [Cov | mean] of X_0: N(0, 10 I_A) conditioned block by block on frames 0..L-1 (spec 4.2).

    Rows 0..L-2 of ``obs`` must come from the true variances; row L-1 is the
    emission at t' = 0. Also returns the summed log predictive densities of these
    L frames.
    """
    prior = jnp.concatenate([PRIOR_VARIANCE * jnp.eye(latent_dim, dtype=dtype), jnp.zeros((latent_dim, 1), dtype)], 1)
    blocks, lls = jax.vmap(_update, in_axes=(0, 0, 0, None))(obs.R, obs.w, obs.const, prior)
    eye = jnp.eye(n_lags, dtype=dtype)
    cov = jnp.einsum("ij,iab->iajb", eye, blocks[:, :, :latent_dim]).reshape(n_lags * latent_dim, -1)
    return jnp.concatenate([cov, blocks[:, :, latent_dim].reshape(-1, 1)], axis=1), jnp.sum(lls)


# --------------------------------------------------------------------------- #
# Forward filters. Both return, for t' = 0..N-1, the filtered [Cov | mean] of X_t'
# and the predicted [Cov^- | mean^-] of X_{t'+1} (each (N, A, A+1)),
# and the sum of the log predictive densities of frames L..T-1.
# --------------------------------------------------------------------------- #
def _filter_serial(steps: _Steps, obs: _PseudoObs, filt0):
    """Kalman filter by ``lax.scan`` from the filtered [Cov | mean] of X_0."""

    def body(filt, args):
        step, obs_R, obs_w, obs_const = args
        _, pred = _predict(step, filt)
        new, log_pred = _update(obs_R, obs_w, obs_const, pred)
        return new, (filt, pred, log_pred)

    _, (filts, preds, lls) = jax.lax.scan(body, filt0, (steps, *obs))
    return filts, preds, jnp.sum(lls)


def _filter_element(step: _Steps, obs_R, obs_w):
    """Särkkä & García-Fernández (2021) element (A, b, C, eta, J) of p(X_t' | X_{t'-1}, y_tau).

    With H = [0 | R] and unit observation noise: S = H Qb H^T + I, K = Qb H^T S^{-1},
    A = F - K H F, b = [0; b] + K (w - H [0; b]), C = Qb - K H Qb,
    eta = (H F)^T S^{-1} (w - H [0; b]), J = (H F)^T S^{-1} H F.
    """
    latent_dim = step.Q.shape[-1]
    lifted = step.A_row.shape[-1]
    F = _apply_F(step, jnp.eye(lifted, dtype=step.Q.dtype))
    noise = _transition_noise(step)
    h_noise = _mm(obs_R, noise[-latent_dim:, :])  # H Qb, (P, A)
    _, s_inv_chol = _chol_inv_small(_mm_nt(h_noise[:, -latent_dim:], obs_R) + jnp.eye(latent_dim, dtype=F.dtype))
    white_noise = _mm(s_inv_chol, h_noise)  # L^{-1} H Qb
    white_hf = _mm(s_inv_chol, _mm(obs_R, step.A_row))  # L^{-1} H F
    resid = _mv(s_inv_chol, obs_w - _mv(obs_R, step.b))
    bias = jnp.concatenate([jnp.zeros(lifted - latent_dim, F.dtype), step.b])
    return (
        F - _mm_tn(white_noise, white_hf),
        bias + _mv(_t(white_noise), resid),
        _sym(noise - _mm_tn(white_noise, white_noise)),
        _mv(_t(white_hf), resid),
        _mm_tn(white_hf, white_hf),
    )


def _combine_filter(earlier, later):
    """Associative operator on filtering elements (Särkkä & García-Fernández 2021, Lemma 8).

    With C_i = U U^T and K = I + U^T J_j U (both SPD):
    M = (I + C_i J_j)^{-1} = I - U K^{-1} U^T J_j, M C_i = U K^{-1} U^T and
    M^T J_j = J_j - J_j U K^{-1} U^T J_j, so only SPD factorisations are needed.
    """
    a_i, b_i, c_i, eta_i, j_i = earlier
    a_j, b_j, c_j, eta_j, j_j = later
    n = a_i.shape[-1]
    vec = lambda m, x: (m @ x[..., None])[..., 0]  # noqa: E731  (plain dots: few HLO ops per level)
    u = _cholesky_rolled(c_i)
    ut_j = _t(u) @ j_j  # U^T J_j
    k_chol = _cholesky_rolled(jnp.eye(n, dtype=a_i.dtype) + ut_j @ u)
    both = _solve_lower_rolled(k_chol, jnp.concatenate([_t(u), ut_j], axis=-1))
    v, w = both[..., :n], both[..., n:]  # L_K^{-1} U^T, L_K^{-1} U^T J_j
    m_a = a_i - _t(v) @ (w @ a_i)  # M A_i
    m_b = b_i - vec(_t(v), vec(w, b_i) - vec(v, eta_j))  # M (b_i + C_i eta_j)
    a_v = a_j @ _t(v)
    resid = eta_j - vec(j_j, b_i)
    return (
        a_j @ m_a,
        vec(a_j, m_b) + b_j,
        _sym(a_v @ _t(a_v) + c_j),
        vec(_t(a_i), resid - vec(_t(w), vec(v, resid))) + eta_i,
        _sym(_t(a_i) @ (j_j - _t(w) @ w) @ a_i + j_i),
    )


def _filter_parallel(steps: _Steps, obs: _PseudoObs, filt0):
    """The same by an associative scan over filtering elements, then the predictions."""
    lifted = filt0.shape[0]
    mean0, cov0 = filt0[:, lifted], filt0[:, :lifted]
    real = jax.tree.map(lambda a: a[:-1], (steps, obs))
    mats, biases, covs, etas, infos = jax.vmap(_filter_element)(real[0], real[1].R, real[1].w)
    zeros = jnp.zeros_like(cov0)
    elems = (
        jnp.concatenate([zeros[None], mats]),
        jnp.concatenate([mean0[None], biases]),
        jnp.concatenate([cov0[None], covs]),
        jnp.concatenate([jnp.zeros_like(mean0)[None], etas]),
        jnp.concatenate([zeros[None], infos]),
    )
    _, means, covs, _, _ = jax.lax.associative_scan(_combine_filter, elems)
    filts = jnp.concatenate([covs, means[..., None]], axis=-1)
    _, preds = jax.vmap(_predict)(steps, filts)
    _, lls = jax.vmap(_update)(*obs, preds)
    return filts, preds, jnp.sum(lls)


# --------------------------------------------------------------------------- #
# Backward sampling
# --------------------------------------------------------------------------- #
def _backward_elements(steps: _Steps, filts, preds, normals, jitter, terminal=None):
    """(E, g) with X_t' = E_t' X_{t'+1} + g_t' (noise included), for all the given steps at once.

    p(X_t' | X_{t'+1}, y_{0:tau}) = N(m + G (X_{t'+1} - m^-), C) with
    C = Cov - (F Cov)^T (Cov^-)^{-1} F Cov and G = Cov F^T (Cov^-)^{-1} = C F^T Qb^{-1};
    the draw uses C + jitter I (spec 4.2). At the terminal step G = 0 and C is the
    filtered covariance of X_{N-1}, which is drawn without jitter. ``terminal``: (n,) bool
    marking that step among the given ones (default: the last one).
    """
    size = steps.Q.shape[-1]
    lifted = filts.shape[-2]
    chol, invs = _keep(_block_cholesky(preds[:, :, :lifted], size))  # Cov^- = L L^T
    # row blocks of F Cov: the copied blocks are slices of Cov, only the newest is a product
    covs = filts[:, :, :lifted]
    f_cov = [steps.shift[:, None, None] * covs[:, (k + 1) * size : (k + 2) * size] for k in range(lifted // size - 1)]
    f_cov.append(_mm(steps.A_row, covs))
    white = _keep(_block_solve(chol, invs, f_cov))  # row blocks of L^{-1} F Cov
    cond_cov = _keep(_sym(covs - _total(_mm_tn(block, block) for block in white)))
    # G = C F^T Qb^{-1} = [shift C_{:, P:} / copy_var | C A_row^T Q^{-1}]
    _, q_inv_chol = _chol_inv_small(steps.Q)
    q_inv = _keep(_mm_tn(q_inv_chol, q_inv_chol))
    copies = (steps.shift / steps.copy_var)[:, None, None] * cond_cov[:, :, size:]
    gains = _keep(jnp.concatenate([copies, _mm(_mm_nt(cond_cov, steps.A_row), q_inv)], axis=-1))
    if terminal is None:
        terminal = jnp.arange(filts.shape[0]) == filts.shape[0] - 1
    terminal = terminal[:, None, None]
    draw_cov = cond_cov + jnp.where(terminal, 0.0, jitter) * jnp.eye(lifted, dtype=filts.dtype)
    draw_chol = _keep(_block_cholesky(draw_cov, size)[0])  # block columns
    offsets = filts[:, :, lifted] - _mv(gains, preds[:, :, lifted]) + _block_mv(draw_chol, normals)
    return gains, offsets


def _affine_backward_serial(gains, offsets, last=None):
    """X_t = E_t X_{t+1} + g_t backward from t = N-1 by a reverse scan, with X_N = ``last``
    (default 0: E_{N-1} = 0 at the terminal step).

    ``gains`` (N, A, A), or (N,) scalars; ``offsets`` (N, A).
    """
    scalar = gains.ndim == 1

    def body(nxt, args):
        gain, offset = args
        cur = (gain * nxt if scalar else _mv(gain, nxt)) + offset
        return cur, cur

    init = jnp.zeros_like(offsets[0]) if last is None else last
    _, states = jax.lax.scan(body, init, (gains, offsets), reverse=True)
    return states


#: Steps per block of the serial backward pass (``_backward_serial``). Its per-step arrays
#: ((A, A) factors, gains, conditional covariances) for a whole 10 000-frame segment are
#: ~10 MB each and fall out of the CPU caches; a block of 1024 steps keeps them in cache:
#: the backward elements of one 10 030-frame segment took 32.9 ms for all steps at once and
#: 16.8 ms in blocks of ~1250 (P = 4, L = 3; docs/notes.md).
BACKWARD_BLOCK = 1024


def _backward_serial(steps: _Steps, filts, preds, normals, jitter, block=None):
    """The backward pass of the serial sampler: X_t' for t' = 0..N-1, (N, A).

    Blocks of ``block`` (default ``BACKWARD_BLOCK``) steps are processed from the end: each computes its backward
    elements (``_backward_elements``) and runs the recursion X_t' = E_t' X_{t'+1} + g_t'
    from the first state after it. The first block starts at max(0, N - k * block), so it
    may overlap the next one; its overlapping states are recomputed from the same
    elements and the same successor, hence equal. Same draws as ``_backward_elements``
    over all steps followed by ``_affine_backward_serial``.
    """
    num_steps, lifted = filts.shape[0], filts.shape[1]
    size = min(BACKWARD_BLOCK if block is None else block, num_steps)
    if size == num_steps:
        return _affine_backward_serial(*_backward_elements(steps, filts, preds, normals, jitter))
    n_blocks = -(-num_steps // size)

    def body(j, states):
        start = jnp.maximum(num_steps - (j + 1) * size, 0)
        piece = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)  # noqa: E731
        terminal = start + jnp.arange(size) == num_steps - 1
        elements = _backward_elements(jax.tree.map(piece, steps), piece(filts), piece(preds), piece(normals),
                                      jitter, terminal)
        # X after the block (the terminal block's gain is 0, so its value is unused there)
        last = states[jnp.minimum(start + size, num_steps - 1)]
        return jax.lax.dynamic_update_slice_in_dim(states, _affine_backward_serial(*elements, last), start, 0)

    return jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((num_steps, lifted), filts.dtype))


def _affine_backward_parallel(gains, offsets):
    """The same recursion by a reverse associative scan of affine maps."""
    scalar = gains.ndim == 1

    def compose(later, earlier):  # earlier o later: x -> E_e (E_l x + g_l) + g_e
        e_l, g_l = later
        e_e, g_e = earlier
        if scalar:
            return e_e * e_l, e_e[..., None] * g_l + g_e
        return e_e @ e_l, (e_e @ g_l[..., None])[..., 0] + g_e

    _, states = jax.lax.associative_scan(compose, (gains, offsets), reverse=True)
    return states


# --------------------------------------------------------------------------- #
# Public samplers
# --------------------------------------------------------------------------- #
def sample_latent_x(key, ytil, obs_var, mask, z, Ab, Q, Ctil, dtil, jitter, parallel=False):
    """Draw x_{0:T-1} from p(x | z, ytil, params) for one segment (model spec 4.2).

    Lifted state X_t' = [x_t'; ...; x_{t'+L-1}], t' = 0..T-L (N = T-L+1 steps):

    - prior X_0 ~ N(0, 10 I_A), conditioned on frames 0..L-2, each through its own
      block, with their true ``obs_var`` (mask ignored);
    - X_{t'+1} = F_k X_t' + [0; b_k] + N(0, blockdiag(0.01 I, Q_k)) with k = z[t'];
      when the source frame tau = t'+L-1 is padding, F = blockdiag(0, I_P), b = 0
      and the noise is 10 I_A;
    - frame tau = t'+L-1 is observed through the newest block,
      ytil_tau ~ N(Ctil x_tau + dtil, diag(r_tau)), with r_tau = 10 on padded frames.

    X is drawn by forward filtering and backward sampling, and unpacked as
    x_0..x_{L-2} = the first L-1 blocks of X_0, x_tau = the newest block of X_{tau-L+1}.

    Parameters
    ----------
    key : PRNG key
    ytil : (T, O) observations in the aligned frame (O = K*D)
    obs_var : (T, O) positive diagonal observation variances r_t
    mask : (T,) 1 on real frames, 0 on padding
    z : (T-L,) int labels; ``z[i]`` labels frame i + L
    Ab : (S, P, L*P+1) AR coefficients, lag blocks oldest first, then the bias
    Q : (S, P, P) AR noise covariances
    Ctil : (O, P), dtil : (O,) emission in the aligned frame
    jitter : scalar added as ``jitter * I_A`` to every backward-conditional
        covariance p(X_t' | X_{t'+1}, y_{0:tau}), t' < N-1 (not to the final
        filtered draw of X_{N-1}). The reference applies it only in its serial
        sampler (spec 4.2, 14 #12); here both variants apply it, so they sample
        the same distribution for every ``jitter``. ``jitter = 0`` is exact.
    parallel : bool (static)
        False: ``lax.scan`` forward filter (O(T) depth). True: associative-scan
        filter and backward pass (Särkkä & García-Fernández 2021; O(log T) depth,
        several times the flops and memory, much longer compiles).

    Returns
    -------
    x : (T, P) the draw
    log_normalizer : scalar, log p(ytil_{0:T-1} | z, params) under this model:
        the sum over all T frames of the log predictive densities, i.e. frames
        0..L-2 under the prior N(0, 10 I) with their true variances, then frames
        L-1..T-1 one filter step at a time (padded frames with variance 10).
    """
    dtype = ytil.dtype
    num_frames = ytil.shape[0]
    latent_dim = Ab.shape[1]
    n_lags = (Ab.shape[2] - 1) // latent_dim
    num_steps = num_frames - n_lags + 1
    (u,) = uniforms(key, (num_steps, n_lags * latent_dim), dtype=dtype)
    normals = _keep(normal_from_uniform(u))

    # frames 0..L-2 with their true variances (prior conditioning), all others masked
    head = jnp.arange(num_frames) < n_lags - 1
    var = jnp.where(head[:, None] | (mask[:, None] > 0), obs_var, PAD_VARIANCE)
    obs = _pseudo_observations(ytil, var, Ctil, dtil)
    filt0, log_norm0 = _initial_state(jax.tree.map(lambda a: a[:n_lags], obs), n_lags, latent_dim, dtype)

    steps = _lifted_steps(Ab, Q, z, mask, n_lags)
    # emissions of frames L..T-1 at t' = 1..N-1, then none after the terminal step
    step_obs = jax.tree.map(lambda a: jnp.concatenate([a[n_lags:], jnp.zeros_like(a[:1])]), obs)
    filt = _filter_parallel if parallel else _filter_serial
    filts, preds, log_norm = filt(steps, step_obs, filt0)
    if parallel:
        states = _affine_backward_parallel(*_backward_elements(steps, filts, preds, normals, jitter))
    else:
        states = _backward_serial(steps, filts, preds, normals, jitter)
    blocks = states.reshape(num_steps, n_lags, latent_dim)
    x = jnp.concatenate([blocks[0, : n_lags - 1], blocks[:, -1]])
    return x, log_norm0 + log_norm


def sample_random_walk(key, obs_mean, obs_var, mask, sigmasq_loc, prior_var=1e4, parallel=False):
    """Draw v_{0:T-1} from the Gaussian random-walk posterior of one segment (model spec 4.4).

    v_0 ~ N(0, prior_var I_D); v_t = v_{t-1} + N(0, q_t I_D) with q_t = sigmasq_loc,
    or 10 * sigmasq_loc when frame t-1 is padding (mask[t-1] == 0);
    obs_mean_t ~ N(v_t, obs_var_t I_D). The D coordinates are independent with
    shared scalar variances, so this is a scalar Kalman filter vectorised over D.
    Forward filtering, then backward sampling
    v_t | v_{t+1} ~ N(m_t + G_t (v_{t+1} - m_t), G_t q_{t+1}), G_t = P_t / (P_t + q_{t+1}).

    Parameters
    ----------
    key : PRNG key
    obs_mean : (T, D) pseudo-observations mu_t
    obs_var : (T,) their variances g_t (the caller sets the padded frames' value)
    mask : (T,) 1 on real frames
    sigmasq_loc : scalar random-walk step variance
    prior_var : scalar variance of v_0
    parallel : bool (static); True runs filter and sampler as associative scans.

    Returns
    -------
    v : (T, D)
    """
    dtype = obs_mean.dtype
    num_frames, dim = obs_mean.shape
    (u,) = uniforms(key, (num_frames, dim), dtype=dtype)
    normals = _keep(normal_from_uniform(u))
    step_var = sigmasq_loc * jnp.where(mask[:-1] > 0, 1.0, PAD_VARIANCE).astype(dtype)
    # q_0 = prior_var from "v_{-1}" = 0 makes every frame the same predict-update step
    step_var = jnp.concatenate([jnp.full((1,), prior_var, dtype), step_var])
    filt = _rw_filter_parallel if parallel else _rw_filter_serial
    means, variances = filt(obs_mean, obs_var.astype(dtype), step_var)
    last = jnp.arange(num_frames) == num_frames - 1  # no successor: G = 0, filtered variance
    next_var = jnp.append(step_var[1:], 1.0)
    gains = jnp.where(last, 0.0, variances / (variances + next_var))
    cond_var = jnp.where(last, variances, gains * next_var)
    offsets = (1 - gains)[:, None] * means + jnp.sqrt(cond_var)[:, None] * normals
    backward = _affine_backward_parallel if parallel else _affine_backward_serial
    return backward(gains, offsets)


def _rw_filter_serial(obs_mean, obs_var, step_var):
    """Filtered means (T, D) and variances (T,) of the random walk, sequentially."""

    def body(carry, args):
        mean, var = carry
        mu, g, q = args
        pred = var + q
        mean = mean + pred / (pred + g) * (mu - mean)
        var = pred * g / (pred + g)
        return (mean, var), (mean, var)

    init = (jnp.zeros(obs_mean.shape[1], obs_mean.dtype), jnp.zeros((), obs_mean.dtype))
    _, (means, variances) = jax.lax.scan(body, init, (obs_mean, obs_var, step_var))
    return means, variances


def _rw_filter_parallel(obs_mean, obs_var, step_var):
    """The same filter by associative scans.

    The variance map P -> g (P + q) / (P + q + g) is the Moebius transform of
    [[g, g q], [1, q + g]], so the variances are ratios of entries of running
    2 x 2 matrix products (rescaled; entries stay positive, no cancellation). The
    means then follow the affine map m_t = (1 - k_t) m_{t-1} + k_t mu_t.
    """
    g, q = obs_var, step_var
    one = jnp.ones_like(g)
    mats = jnp.stack([jnp.stack([g, g * q], -1), jnp.stack([one, q + g], -1)], -2)  # (T, 2, 2)

    def compose_mobius(earlier, later):
        prod = later @ earlier
        return prod / jnp.sum(jnp.abs(prod), axis=(-2, -1), keepdims=True)

    prods = jax.lax.associative_scan(compose_mobius, mats)
    variances = prods[:, 0, 1] / prods[:, 1, 1]  # applied to P_{-1} = 0
    pred = jnp.concatenate([q[:1], variances[:-1] + q[1:]])
    keep = g / (pred + g)

    def compose_affine(earlier, later):
        a_e, c_e = earlier
        a_l, c_l = later
        return a_l * a_e, a_l[..., None] * c_e + c_l

    _, means = jax.lax.associative_scan(compose_affine, (keep, (1 - keep)[:, None] * obs_mean))
    return means, variances
