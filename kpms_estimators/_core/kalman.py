"""Kalman forward filtering, backward sampling for the keypoint SLDS (model spec 4.2, 4.4).

Both samplers act on ONE segment; vmap them over segments. Each takes all of its
randomness from a single ``uniforms`` draw.

``sample_latent_x`` lifts the AR(L) latent trajectory to the first-order state
X_t' = [x_t'; ...; x_{t'+L-1}] (A = L*P) and works in a square-root information
form of the emission: per frame, ``diag(r)^{-1/2} Ctil = Q_o R_o`` (thin QR, so
``R_o^T R_o = Ctil^T diag(1/r) Ctil``), and the O-dimensional observation is
replaced by the q = min(O, P) dimensional pseudo-observation
``w = Q_o^T diag(r)^{-1/2} (ytil - dtil) = R_o x_new + N(0, I_q)``, exact including
the likelihood constant. The QR is vectorised over frames before any scan, so a
filter step costs O(A^2 P + P^3) and never forms an O x O matrix (spec 13).

Everything that does not need the sequential recursion (predicted covariances,
log predictive densities, backward gains and backward-conditional covariances)
is computed vectorised over time after the forward pass. The backward pass is
then the affine recursion X_t' = E_t' X_{t'+1} + g_t', run by ``lax.scan``
(serial) or ``lax.associative_scan`` (parallel).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from .distributions import normal_from_uniform, psd_cholesky, uniforms

#: Transition noise on the copied lag blocks of the lifted state (spec 4.2).
COPY_NOISE = 0.01
#: Variance used for padded frames: emission noise and the padded-source transition noise.
PAD_VARIANCE = 10.0
#: Prior variance of every coordinate of X_0 (spec 4.2).
PRIOR_VARIANCE = 10.0


class _Steps(NamedTuple):
    """Lifted transitions X_{t'+1} = F X_t' + [0; b] + N(0, blockdiag(copy_var I, Q)), t' = 0..T-L-1.

    F = [[shift * I_shifted], [A_row]]: ``shift`` is 1 (or 0 when the source frame
    is padding), ``A_row`` (P, A) is A_k (or [0 ... 0 I_P]).
    """

    shift: jax.Array  # (N-1,)
    A_row: jax.Array  # (N-1, P, A)
    b: jax.Array  # (N-1, P)
    Q: jax.Array  # (N-1, P, P) noise on the newest block
    copy_var: jax.Array  # (N-1,) noise variance on the copied blocks


class _PseudoObs(NamedTuple):
    """Per-frame whitened emission: w = R_o x + N(0, I_q); log p(y | x) = log N(w; R_o x, I) + const."""

    R_o: jax.Array  # (T, q, P)
    w: jax.Array  # (T, q)
    const: jax.Array  # (T,)


# --------------------------------------------------------------------------- #
# Model pieces
# --------------------------------------------------------------------------- #
def _pseudo_observations(ytil, obs_var, Ctil, dtil) -> _PseudoObs:
    """Square-root information form of ytil_t ~ N(Ctil x_t + dtil, diag(obs_var_t)), per frame."""
    inv_sd = jax.lax.rsqrt(obs_var)
    u = (ytil - dtil) * inv_sd  # (T, O)
    q_o, r_o = jnp.linalg.qr(Ctil * inv_sd[:, :, None])  # (T, O, q), (T, q, P)
    w = jnp.einsum("toq,to->tq", q_o, u)
    const = -0.5 * (jnp.sum(u**2, -1) - jnp.sum(w**2, -1)) - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * obs_var), -1)
    return _PseudoObs(r_o, w, const)


def _lifted_steps(Ab, Q, z, mask, n_lags) -> _Steps:
    """Per-step transition pieces, with the padded-source rule F = blockdiag(0, I_P), b = 0, cov = 10 I (spec 4.2)."""
    dtype = Ab.dtype
    latent_dim, lifted = Ab.shape[1], Ab.shape[2] - 1
    real = mask[n_lags - 1 : -1] > 0  # source frame tau = t' + L - 1 of each step
    Ab_t = Ab[z]
    newest_only = jnp.eye(latent_dim, lifted, lifted - latent_dim, dtype=dtype)
    return _Steps(
        shift=real.astype(dtype),
        A_row=jnp.where(real[:, None, None], Ab_t[:, :, :lifted], newest_only),
        b=jnp.where(real[:, None], Ab_t[:, :, lifted], 0.0),
        Q=jnp.where(real[:, None, None], Q[z], PAD_VARIANCE * jnp.eye(latent_dim, dtype=dtype)),
        copy_var=jnp.where(real, COPY_NOISE, PAD_VARIANCE).astype(dtype),
    )


def _transition_noise(step: _Steps) -> jax.Array:
    """blockdiag(copy_var I_{A-P}, Q) for one step, (A, A)."""
    latent_dim = step.Q.shape[-1]
    lifted = step.A_row.shape[-1]
    copies = jnp.concatenate([jnp.ones(lifted - latent_dim, step.Q.dtype), jnp.zeros(latent_dim, step.Q.dtype)])
    pad = lifted - latent_dim
    return jnp.diag(step.copy_var * copies) + jnp.pad(step.Q, ((pad, 0), (pad, 0)))


def _apply_F(step: _Steps, mat: jax.Array) -> jax.Array:
    """F @ mat for one step, mat (A, ...), without forming F."""
    latent_dim = step.Q.shape[-1]
    return jnp.concatenate([step.shift * mat[latent_dim:], step.A_row @ mat], axis=0)


def _predict(step: _Steps, mean, cov):
    """Predicted mean and covariance of X_{t'+1} from those of X_t'."""
    latent_dim = step.Q.shape[-1]
    mean = jnp.concatenate([step.shift * mean[latent_dim:], step.A_row @ mean + step.b])
    f_cov = _apply_F(step, cov)
    cov = _apply_F(step, f_cov.T).T + _transition_noise(step)
    return mean, 0.5 * (cov + cov.T)


def _innovation(obs_R, obs_w, mean, cov):
    """Cholesky factor of S = R_o Cov_new R_o^T + I, whitened innovation, and R_o Cov[new, :]."""
    latent_dim = obs_R.shape[-1]
    rc = obs_R @ cov[-latent_dim:, :]  # (q, A) = H Cov
    s = rc[:, -latent_dim:] @ obs_R.T + jnp.eye(obs_R.shape[0], dtype=cov.dtype)
    chol = jnp.linalg.cholesky(s)
    both = solve_triangular(chol, jnp.concatenate([rc, (obs_w - obs_R @ mean[-latent_dim:])[:, None]], 1), lower=True)
    return chol, both[:, -1], both[:, :-1]


def _update(obs_R, obs_w, mean, cov):
    """Condition N(mean, cov) of the lifted state on the pseudo-observation of its newest block."""
    _, innov, gain_t = _innovation(obs_R, obs_w, mean, cov)
    cov = cov - gain_t.T @ gain_t
    return mean + gain_t.T @ innov, 0.5 * (cov + cov.T)


def _log_predictive(obs_R, obs_w, const, mean, cov):
    """log p(y_tau | past) = log N(w; R_o mean_new, R_o Cov_new R_o^T + I) + (q/2) log 2 pi + const."""
    chol, innov, _ = _innovation(obs_R, obs_w, mean, cov)
    return const - 0.5 * jnp.sum(innov**2) - jnp.sum(jnp.log(jnp.diagonal(chol)))


def _initial_state(obs: _PseudoObs, n_lags, latent_dim, dtype):
    """Filtered X_0: N(0, 10 I_A) conditioned, block by block, on frames 0..L-1 (spec 4.2).

    Frames 0..L-2 come with their true variances (``obs`` rows 0..L-2 must be
    built from them); frame L-1 is the emission at t' = 0. Returns the mean (A,),
    block-diagonal covariance (A, A) and the summed log predictive densities.
    """
    prior_mean = jnp.zeros(latent_dim, dtype)
    prior_cov = PRIOR_VARIANCE * jnp.eye(latent_dim, dtype=dtype)
    blocks = jax.tree.map(lambda a: a[:n_lags], obs)
    means, covs = jax.vmap(_update, in_axes=(0, 0, None, None))(blocks.R_o, blocks.w, prior_mean, prior_cov)
    lls = jax.vmap(_log_predictive, in_axes=(0, 0, 0, None, None))(
        blocks.R_o, blocks.w, blocks.const, prior_mean, prior_cov
    )
    eye = jnp.eye(n_lags, dtype=dtype)
    cov = jnp.einsum("ij,iab->iajb", eye, covs).reshape(n_lags * latent_dim, n_lags * latent_dim)
    return means.reshape(-1), cov, jnp.sum(lls)


# --------------------------------------------------------------------------- #
# Forward filters
# --------------------------------------------------------------------------- #
def _filter_serial(steps: _Steps, obs: _PseudoObs, mean0, cov0):
    """Filtered means (N, A) and covariances (N, A, A) by a sequential scan."""

    def body(carry, args):
        step, obs_R, obs_w = args
        mean, cov = _predict(step, *carry)
        mean, cov = _update(obs_R, obs_w, mean, cov)
        return (mean, cov), (mean, cov)

    _, (means, covs) = jax.lax.scan(body, (mean0, cov0), (steps, obs.R_o, obs.w))
    return jnp.concatenate([mean0[None], means]), jnp.concatenate([cov0[None], covs])


def _dense_F(step: _Steps) -> jax.Array:
    lifted = step.A_row.shape[-1]
    return _apply_F(step, jnp.eye(lifted, dtype=step.A_row.dtype))


def _filter_element(step: _Steps, obs_R, obs_w):
    """Särkkä & García-Fernández (2021) element (A, b, C, eta, J) of p(X_t' | X_{t'-1}, y_tau)."""
    latent_dim = step.Q.shape[-1]
    F = _dense_F(step)
    noise = _transition_noise(step)
    h_noise = obs_R @ noise[-latent_dim:, :]  # H Qb, (q, A)
    hf = obs_R @ step.A_row  # H F, (q, A)
    s = h_noise[:, -latent_dim:] @ obs_R.T + jnp.eye(obs_R.shape[0], dtype=F.dtype)
    chol = jnp.linalg.cholesky(s)
    resid = obs_w - obs_R @ step.b
    gain = cho_solve((chol, True), h_noise).T  # K = Qb H^T S^-1, (A, q)
    mat = F - gain @ hf
    bias = jnp.concatenate([jnp.zeros(F.shape[0] - latent_dim, F.dtype), step.b]) + gain @ resid
    cov = noise - gain @ h_noise
    s_inv_hf = cho_solve((chol, True), hf)
    eta = s_inv_hf.T @ resid
    info = hf.T @ s_inv_hf
    return mat, bias, 0.5 * (cov + cov.T), eta, 0.5 * (info + info.T)


def _combine_filter(earlier, later):
    """Associative operator on filtering elements (Särkkä & García-Fernández 2021, eq. 14)."""
    a_i, b_i, c_i, eta_i, j_i = earlier
    a_j, b_j, c_j, eta_j, j_j = later
    eye = jnp.eye(a_i.shape[-1], dtype=a_i.dtype)
    m = eye + c_i @ j_j  # (I + C_i J_j); (I + J_j C_i) = m^T
    tr = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    rhs = jnp.concatenate([a_i, (b_i + (c_i @ eta_j[..., None])[..., 0])[..., None], c_i], axis=-1)
    sol = jnp.linalg.solve(m, rhs)
    n = a_i.shape[-1]
    a = a_j @ sol[..., :n]
    b = (a_j @ sol[..., n : n + 1])[..., 0] + b_j
    c = a_j @ sol[..., n + 1 :] @ tr(a_j) + c_j
    rhs_t = jnp.concatenate([(eta_j - (j_j @ b_i[..., None])[..., 0])[..., None], j_j @ a_i], axis=-1)
    sol_t = jnp.linalg.solve(tr(m), rhs_t)
    eta = (tr(a_i) @ sol_t[..., :1])[..., 0] + eta_i
    info = tr(a_i) @ sol_t[..., 1:] + j_i
    return a, b, 0.5 * (c + tr(c)), eta, 0.5 * (info + tr(info))


def _filter_parallel(steps: _Steps, obs: _PseudoObs, mean0, cov0):
    """Filtered means and covariances by an associative scan over filtering elements."""
    mats, biases, covs, etas, infos = jax.vmap(_filter_element)(steps, obs.R_o, obs.w)
    zeros = jnp.zeros_like(cov0)
    elems = (
        jnp.concatenate([zeros[None], mats]),
        jnp.concatenate([mean0[None], biases]),
        jnp.concatenate([cov0[None], covs]),
        jnp.concatenate([jnp.zeros_like(mean0)[None], etas]),
        jnp.concatenate([zeros[None], infos]),
    )
    _, means, covs, _, _ = jax.lax.associative_scan(_combine_filter, elems)
    return means, covs


# --------------------------------------------------------------------------- #
# Backward sampling
# --------------------------------------------------------------------------- #
def _backward_elements(steps: _Steps, means, covs, pred_means, pred_covs, normals, jitter):
    """(E, g) with X_t' = E_t' X_{t'+1} + g_t' (noise included) and X_{N-1} = g_{N-1}.

    p(X_t' | X_{t'+1}, y_{0:tau}) = N(m + G (X_{t'+1} - m^-), Cov - G F Cov) with
    G = Cov F^T (Cov^-)^{-1}; the draw uses Cov - G F Cov + jitter I (spec 4.2).
    """

    def one(step, mean, cov, pred_mean, pred_cov, normal):
        f_cov = _apply_F(step, cov)  # F Cov = Cov(X_{t'+1}, X_t')
        gain = cho_solve((jnp.linalg.cholesky(pred_cov), True), f_cov).T
        chol = psd_cholesky(cov - gain @ f_cov, jitter)
        return gain, mean - gain @ pred_mean + chol @ normal

    gains, offsets = jax.vmap(one)(steps, means[:-1], covs[:-1], pred_means, pred_covs, normals[:-1])
    last = means[-1] + psd_cholesky(covs[-1], 0.0) @ normals[-1]
    return gains, jnp.concatenate([offsets, last[None]])


def _apply(gain, vec, scalar):
    return gain[..., 0, 0, None] * vec if scalar else (gain @ vec[..., None])[..., 0]


def _affine_backward_serial(gains, offsets, scalar=False):
    """X_{N-1} = g_{N-1}; X_t = E_t X_{t+1} + g_t by a reverse scan.

    ``gains`` (N-1, A, A), or (N-1, 1, 1) scalars when ``scalar``; ``offsets`` (N, A).
    """

    def body(nxt, args):
        gain, offset = args
        cur = _apply(gain, nxt, scalar) + offset
        return cur, cur

    _, states = jax.lax.scan(body, offsets[-1], (gains, offsets[:-1]), reverse=True)
    return jnp.concatenate([states, offsets[-1:]])


def _affine_backward_parallel(gains, offsets, scalar=False):
    """The same recursion by a reverse associative scan of affine maps."""

    def compose(later, earlier):  # earlier o later: x -> E_e (E_l x + g_l) + g_e
        e_l, g_l = later
        e_e, g_e = earlier
        return e_e @ e_l, _apply(e_e, g_l, scalar) + g_e

    gains = jnp.concatenate([gains, jnp.zeros_like(gains[:1])])
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
        False: ``lax.scan`` filter and backward pass (O(T) depth). True:
        associative scans (Särkkä & García-Fernández 2021; O(log T) depth, several
        times the memory and flops, longer compiles).

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
    normals = normal_from_uniform(u)

    masked_var = jnp.where(mask[:, None] > 0, obs_var, PAD_VARIANCE)
    obs = _pseudo_observations(ytil, masked_var, Ctil, dtil)
    if n_lags > 1:  # prior-conditioning frames 0..L-2 use their true variances
        head = _pseudo_observations(ytil[: n_lags - 1], obs_var[: n_lags - 1], Ctil, dtil)
        init_obs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[n_lags - 1 : n_lags]]), head, obs)
    else:
        init_obs = jax.tree.map(lambda a: a[:1], obs)
    mean0, cov0, log_norm0 = _initial_state(init_obs, n_lags, latent_dim, dtype)

    steps = _lifted_steps(Ab, Q, z, mask, n_lags)
    step_obs = jax.tree.map(lambda a: a[n_lags:], obs)  # frames L..T-1, emissions at t' = 1..N-1
    filt = _filter_parallel if parallel else _filter_serial
    means, covs = filt(steps, step_obs, mean0, cov0)

    pred_means, pred_covs = jax.vmap(_predict)(steps, means[:-1], covs[:-1])
    lls = jax.vmap(_log_predictive)(step_obs.R_o, step_obs.w, step_obs.const, pred_means, pred_covs)
    log_normalizer = log_norm0 + jnp.sum(lls)

    gains, offsets = _backward_elements(steps, means, covs, pred_means, pred_covs, normals, jitter)
    backward = _affine_backward_parallel if parallel else _affine_backward_serial
    states = backward(gains, offsets)  # (N, A)
    blocks = states.reshape(num_steps, n_lags, latent_dim)
    x = jnp.concatenate([blocks[0, : n_lags - 1], blocks[:, -1]])
    return x, log_normalizer


def sample_random_walk(key, obs_mean, obs_var, mask, sigmasq_loc, prior_var=1e4, parallel=False):
    """Draw v_{0:T-1} from the Gaussian random-walk posterior of one segment (model spec 4.4).

    v_0 ~ N(0, prior_var I_D); v_t = v_{t-1} + N(0, q_t I_D) with q_t = sigmasq_loc,
    or 10 * sigmasq_loc when frame t-1 is padding (mask[t-1] == 0);
    obs_mean_t ~ N(v_t, obs_var_t I_D). The D coordinates are independent with
    shared scalar variances, so this is a scalar Kalman filter vectorised over D.

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
    normals = normal_from_uniform(u)
    step_var = sigmasq_loc * jnp.where(mask[:-1] > 0, 1.0, PAD_VARIANCE).astype(dtype)
    # q_0 = prior_var with "v_{-1}" = 0 makes every frame the same predict-update step
    step_var = jnp.concatenate([jnp.full((1,), prior_var, dtype), step_var])
    filt = _rw_filter_parallel if parallel else _rw_filter_serial
    means, variances = filt(obs_mean, obs_var.astype(dtype), step_var)
    # p(v_t | v_{t+1}, mu_{0:t}) = N(m_t + G_t (v_{t+1} - m_t), G_t q_{t+1}), G_t = P_t / (P_t + q_{t+1})
    gains = variances[:-1] / (variances[:-1] + step_var[1:])
    offsets = (1 - gains)[:, None] * means[:-1] + jnp.sqrt(gains * step_var[1:])[:, None] * normals[:-1]
    last = means[-1] + jnp.sqrt(variances[-1]) * normals[-1]
    offsets = jnp.concatenate([offsets, last[None]])
    if parallel:
        return _affine_backward_parallel(gains[:, None, None], offsets, scalar=True)
    return _affine_backward_serial(gains[:, None, None], offsets, scalar=True)


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
