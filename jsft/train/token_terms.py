"""Per-token loss terms fused with the output projection, chunked like jsft/train/chunked_ce.py.

`chunked_terms(x, head, targets, softcap, chunk, terms)` returns {name: [B, T] float32} for the terms
an objective needs, computed from each chunk's logits l (float32) and never forming the batch's
[B, T, V] logits, with a hand-written backward over vocabulary blocks:

    nll     lse - l_y                                   d/dl_v = p_v - [v = y]
    z       lse^2                      (z-loss)          d/dl_v = 2 lse p_v
    smooth  lse - mean_v l_v           (label smoothing) d/dl_v = p_v - 1/V
    gem     sum_v q_v w_v (l_v - l_y)  (GEM)             d/dl_v = q_v w_v - [v = y] sum_u q_u w_u

with p = softmax(l), q = softmax(l / beta) and w (h = linear: 1; log_sigmoid: sigmoid(0.01 (l - l_y)))
held constant, as the GEM reference implementation detaches them (jsft/train/objectives.py cites the
paper). `reference_terms` computes the same from full logits with autodiff: the oracle of the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsft.train.chunked_ce import VOCAB_BLOCK, _chunks, _logits, _target_logit, _unchunk, block_backward

GEM_H = ("linear", "log_sigmoid")
_SIGMOID_SCALE = 0.01  # the reference implementation's slope in h = log_sigmoid


@dataclasses.dataclass(frozen=True)
class Terms:
    """Which terms to compute (hashable: a static argument of the kernel)."""

    z: bool = False
    smooth: bool = False
    gem_beta: float = 0.0  # > 0: the GEM term with this beta
    gem_h: str = "linear"

    def names(self) -> tuple[str, ...]:
        return ("nll",) + ("z",) * self.z + ("smooth",) * self.smooth + ("gem",) * (self.gem_beta > 0)


def _gem_weights(logits: jax.Array, target_logit: jax.Array, h: str) -> jax.Array:
    if h == "linear":
        return jnp.ones_like(logits)
    return jax.nn.sigmoid(_SIGMOID_SCALE * (logits - target_logit[..., None]))


def _token_terms(logits: jax.Array, targets: jax.Array, terms: Terms) -> tuple[dict, dict]:
    """(terms {name: [..]}, residuals {lse, lse_q, l_y, s}) from full-vocabulary logits [..., V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    l_y = _target_logit(logits, targets)
    out = {"nll": lse - l_y}
    res = {"lse": lse, "l_y": l_y}
    if terms.z:
        out["z"] = lse * lse
    if terms.smooth:
        out["smooth"] = lse - jnp.mean(logits, axis=-1)
    if terms.gem_beta > 0:
        lse_q = jax.nn.logsumexp(logits / terms.gem_beta, axis=-1)
        q = jnp.exp(logits / terms.gem_beta - lse_q[..., None])
        qw = q * _gem_weights(logits, l_y, terms.gem_h)
        s = jnp.sum(qw, axis=-1)
        out["gem"] = jnp.sum(qw * logits, axis=-1) - s * l_y
        res.update(lse_q=lse_q, s=s)
    return out, res


def reference_terms(logits_btv: jax.Array, targets_bt: jax.Array, terms: Terms) -> dict[str, jax.Array]:
    """The same terms from full logits, differentiated by autodiff with q and w held constant."""
    logits = logits_btv.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    l_y = _target_logit(logits, targets_bt)
    out = {"nll": lse - l_y}
    if terms.z:
        out["z"] = lse * lse
    if terms.smooth:
        out["smooth"] = lse - jnp.mean(logits, axis=-1)
    if terms.gem_beta > 0:
        q = jax.lax.stop_gradient(jax.nn.softmax(logits / terms.gem_beta, axis=-1))
        w = jax.lax.stop_gradient(_gem_weights(logits, l_y, terms.gem_h))
        log_p = jax.nn.log_softmax(logits, axis=-1)
        out["gem"] = -jnp.sum(q * w * ((l_y - lse)[..., None] - log_p), axis=-1)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_terms(
    x_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, softcap: float, chunk: int, terms: Terms
) -> dict[str, jax.Array]:
    """{name: [B, T] float32} of `terms` under logits = softcap(x @ head); see the module docstring."""
    return _forward(x_btd, head_dv, targets_bt, softcap, chunk, terms)[0]


def _forward(x_btd, head_dv, targets_bt, softcap, chunk, terms):
    def body(_, xs):
        x_bcd, t_bc = xs
        logits, _ = _logits(x_bcd, head_dv, softcap)
        return None, _token_terms(logits, t_bc, terms)

    t = x_btd.shape[1]
    _, (out, res) = jax.lax.scan(body, None, (_chunks(x_btd, chunk), _chunks(targets_bt, chunk)))
    return {k: _unchunk(v, t) for k, v in out.items()}, (x_btd, head_dv, targets_bt, res)


def _block_grad(logits, hit, res_i, g_i, terms: Terms, vocab: int):
    """d(sum of cotangent-weighted terms)/d logits for one [B, C, block] block of columns."""
    p = jnp.exp(logits - res_i["lse"][..., None])
    d = (p - hit) * g_i["nll"][..., None]
    if terms.z:
        d = d + (2.0 * res_i["lse"] * g_i["z"])[..., None] * p
    if terms.smooth:
        d = d + (p - 1.0 / vocab) * g_i["smooth"][..., None]
    if terms.gem_beta > 0:
        q = jnp.exp(logits / terms.gem_beta - res_i["lse_q"][..., None])
        qw = q * _gem_weights(logits, res_i["l_y"], terms.gem_h)
        d = d + (qw - hit * res_i["s"][..., None]) * g_i["gem"][..., None]
    return d


def _bwd(softcap, chunk, terms, residuals, g):
    """chunked_ce's backward over vocabulary blocks, with the gradient of every requested term
    summed into one [B, C, block] array per block."""
    x_btd, head_dv, targets_bt, res = residuals  # res: already chunked, [N, B, C] each
    vocab = head_dv.shape[1]
    ts = _chunks(targets_bt, chunk)
    gs = {k: _chunks(g[k].astype(jnp.float32), chunk) for k in terms.names()}

    def logits_grad(i, logits, columns):
        hit = (columns == ts[i][..., None]).astype(jnp.float32)
        res_i = {k: r[i] for k, r in res.items()}
        g_i = {k: gk[i] for k, gk in gs.items()}
        return _block_grad(logits, hit, res_i, g_i, terms, vocab)

    return (*block_backward(x_btd, head_dv, softcap, chunk, VOCAB_BLOCK, logits_grad), None)


chunked_terms.defvjp(_forward, _bwd)
