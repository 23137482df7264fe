"""llama.cpp's reference parameter search for the GGUF K-quants, vectorised over rows in torch.

``gguf_grids`` needs, for one block of weights, the scales (and mins) that llama.cpp's
``quantize_row_*_ref`` would store, so that a model quantized here is the model llama.cpp's own
quantizer would have written. Those reference quantizers pick scales with small searches
(``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants`` in ``ggml-quants.c``); this module
re-implements them, with every lane of a ``[lanes, n]`` tensor one sub-block.

Float32 fidelity, because a search compares errors and a different last bit can flip a choice:

* sums run left to right (``_seq_sum``), as the C loops accumulate; ``torch.sum`` reorders;
* every constant is the float32 value the C code forms (``0.1f * is`` computed in numpy float32);
* ``c / t`` is written ``_rdiv(c, t)``: torch computes ``scalar / tensor`` as
  ``tensor.reciprocal() * scalar``, two roundings instead of one;
* ``nearest_int`` (the ``+ 1.5 * 2^23`` trick) rounds half to even, which is ``torch.round``;
* ``sqrtf`` is taken in float64 and rounded: torch's float32 CPU ``sqrt`` is off by one ulp for
  about 1 value in 150, while a float64 root rounded to float32 is the correctly rounded one.

What is matched is strict IEEE float32 without fused multiply-adds, i.e. ``ggml-quants.c`` built
with ``-ffp-contract=off`` (checked against such a build: same scales, mins and dequantized
weights). A build with FMA contraction (GCC's default once FMA is enabled, e.g. ``-march=native``
or aarch64) breaks the searches' near-ties differently: on Gaussian weights about 25 % of Q2_K
blocks, 6 % of Q4_K, 0.4 % of Q6_K, with the same error on average. The file written by
``gguf_grids`` is still exactly what the search scored, only not byte-identical to that build.

The non-reference ("imatrix") variants, ``make_qkx3_quants`` and ``make_qp_quants``, are left out:
they need per-weight importances, which ``ggml-quants.c`` only uses when given an imatrix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))  # llama.cpp's "all zero" threshold, as a float32


def _rdiv(numerator: float, t: Tensor) -> Tensor:
    """``numerator / t`` rounded once (``numerator`` must be float32-exact)."""
    return torch.full_like(t, numerator) / t


def _seq_sum(t: Tensor) -> Tensor:
    """Float32 sum over the FIRST dimension, in order, like ``for (i...) s += t[i]``. The searches
    keep sub-blocks element-major (``[n, lanes]``, see ``_columns``) so each step reads
    contiguous memory."""
    acc = torch.zeros(t.shape[1:], dtype=torch.float32)
    for row in t:
        acc += row
    return acc


def _columns(x: Tensor) -> Tensor:
    """``[lanes, n]`` -> element-major ``[n, lanes]``: per-lane values then broadcast as-is."""
    return x.t().contiguous()


def nearest(t: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``: round half to even (kept as float for the arithmetic)."""
    return torch.round(t)


def fp16(t: Tensor) -> Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t))``: what a stored half-precision scale reads as."""
    return t.half().float()


def first_abs_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(amax, max)`` per lane: the largest ``|x|`` and the signed value where it first occurs
    (the C loops keep the first of equal magnitudes: ``if (ax > amax)``)."""
    ax = x.abs()
    index = ax.argmax(dim=-1, keepdim=True)  # the first maximal index
    return ax.gather(-1, index).squeeze(-1), x.gather(-1, index).squeeze(-1)


def make_qx_quants(x: Tensor, nmax: int) -> Tensor:
    """Scale of a symmetric sub-block (``x`` [lanes, n]) with levels ``-nmax .. nmax-1``
    (``rmse_type`` 1, no importances: weights ``x^2``): the ``-nmax / max`` scale, then 18 nearby
    ones, keeping the one whose least-squares refit explains most of ``sum w x^2``. Returns the
    scale per lane."""
    amax, vmax = first_abs_max(x)
    xt = _columns(x)
    w = xt * xt
    wx = w * xt  # "w*x[i]*l" is (w * x) * l

    def refit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        levels = nearest(iscale * xt).clamp(-nmax, nmax - 1)
        return _seq_sum(wx * levels), _seq_sum(w * levels * levels)

    sumlx, suml2 = refit(_rdiv(float(-nmax), vmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -float(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        sumlx, suml2 = refit(_rdiv(numerator, vmax))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(amax < GROUP_MAX_EPS, torch.zeros_like(scale), scale)


def make_q3_quants(x: Tensor, nmax: int = 4, passes: int = 5) -> Tensor:
    """Scale of a Q3_K sub-block (``x`` [lanes, n], levels ``-nmax .. nmax-1``, weights ``x^2``):
    start from ``-nmax / max``, then up to ``passes`` sweeps of coordinate descent that move one
    level at a time when that improves the weighted fit. The sweep is sequential in the element
    (each move changes the sums the next one sees), vectorised over lanes; a sweep that changes
    nothing is a fixed point, so running every pass equals llama.cpp's early exit."""
    amax, vmax = first_abs_max(x)
    xt = _columns(x)
    w = xt * xt
    wx = w * xt
    levels = nearest(_rdiv(float(-nmax), vmax) * xt).clamp(-nmax, nmax - 1)
    sumlx, suml2 = _seq_sum(wx * levels), _seq_sum(w * levels * levels)
    for _ in range(passes):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(xt.shape[0]):
            wi, xi, wxi, li = w[i], xt[i], wx[i], levels[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = nearest(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            take = (slx > 0) & (new != li)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(amax < GROUP_MAX_EPS, torch.zeros_like(scale), scale)


def make_qkx2_quants(
    x: Tensor, weights: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor]:
    """Scale and min of an asymmetric sub-block ``x ~ scale * L - min`` (``x``, ``weights``
    [lanes, n]), ``L`` in ``0 .. nmax``: the min-max fit, then ``nstep + 1`` trial inverse scales
    around it, each followed by a weighted least-squares refit of scale and min (min kept
    ``<= 0``), keeping the lowest weighted error (absolute with ``use_mad``, squared otherwise).
    As in llama.cpp, a trial that wins moves ``min``, and later trials measure from the new one.
    Returns ``(scale, the_min)`` with ``the_min = -min >= 0``."""
    vmin = x.min(dim=-1).values.clamp(max=0)  # "if (min > 0) min = 0"
    vmax = x.max(dim=-1).values
    flat = vmax == vmin
    xt, wt = _columns(x), _columns(weights)
    sum_w, sum_x = _seq_sum(wt), _seq_sum(wt * xt)
    n = float(nmax)

    def error(scale: Tensor, low: Tensor, levels: Tensor) -> Tensor:
        diff = levels * scale  # in place from here: each step still rounds once, as in C
        diff += low
        diff -= xt
        if use_mad:
            diff.abs_()
        else:
            diff *= diff
        diff *= wt
        return _seq_sum(diff)

    iscale = _rdiv(n, vmax - vmin)
    scale = _rdiv(1.0, iscale)
    best = error(scale, vmin, nearest(iscale * (xt - vmin)).clamp(0, nmax))
    for step in range(nstep + 1):
        numerator = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(n))
        iscale = _rdiv(numerator, vmax - vmin)
        trial = nearest(iscale * (xt - vmin)).clamp(0, nmax)
        wl = wt * trial  # "w*l*l" is (w * l) * l, "w*l*x" is (w * l) * x
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * trial), _seq_sum(wl * xt)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, trial)
        take = (det > 0) & (current < best)
        best = torch.where(take, current, best)
        scale = torch.where(take, this_scale, scale)
        vmin = torch.where(take, this_min, vmin)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -vmin


def _lanes(w: Tensor, sub: int) -> Tensor:
    """``[rows, 256]`` -> ``[rows * 256/sub, sub]``: one lane per sub-block."""
    if w.ndim != 2 or w.shape[1] != QK_K:
        raise ValueError(f"a K-quant super-block is [rows, {QK_K}], got {tuple(w.shape)}")
    return w.float().reshape(-1, sub)


def _unsigned_byte(levels: Tensor, cap: int) -> Tensor:
    """``MIN(cap, (uint8_t) nearest_int(v))``: C stores a negative level as its byte, 256 + l."""
    return torch.remainder(levels, 256).clamp(max=cap)


def fit_q6_k(w: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_row_q6_K_ref``'s parameters: ``(d, sc)`` with ``d`` [rows] the fp16 super-scale
    (as float32) and ``sc`` [rows, 16] the signed 8-bit sub-block scales."""
    rows = w.shape[0]
    scales = make_qx_quants(_lanes(w, 16), 32).reshape(rows, 16)
    max_abs, max_scale = first_abs_max(scales)
    empty = max_abs < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = torch.where(empty, torch.zeros_like(max_abs), fp16(_rdiv(1.0, iscale)))
    sc = nearest(iscale[:, None] * scales).clamp(-128, 127)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    return d, sc.long()


def fit_q3_k(w: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_row_q3_K_ref``'s parameters: ``(d, sc)`` with ``sc`` [rows, 16] the 6-bit
    sub-block scales as stored (biased by 32; the dequantized multiplier is ``d * (sc - 32)``)."""
    rows = w.shape[0]
    scales = make_q3_quants(_lanes(w, 16)).reshape(rows, 16)
    _, max_scale = first_abs_max(scales)
    empty = max_scale == 0
    iscale = _rdiv(-32.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = torch.where(empty, torch.zeros_like(max_scale), fp16(_rdiv(1.0, iscale)))
    sc = nearest(iscale[:, None] * scales).clamp(-32, 31) + 32
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)  # llama.cpp memsets the scales
    return d, sc.long()


def _quantize_scales(values: Tensor, levels: int, wrap: bool) -> tuple[Tensor, Tensor]:
    """Sub-block scales (or mins) ``>= 0`` onto ``0 .. levels`` times one fp16 super-scale:
    ``(super, codes)`` with ``super = fp16(max / levels)``; all-zero -> ``(0, 0)``."""
    top = values.max(dim=-1).values
    present = top > 0  # "max = 0; if (v > max) max = v": +0.0 unless some value is positive
    top = torch.where(present, top, torch.zeros_like(top))
    inverse = torch.where(present, _rdiv(float(levels), torch.where(present, top, 1)), 0)
    codes = nearest(inverse[:, None] * values)
    codes = _unsigned_byte(codes, levels) if wrap else codes.clamp(0, levels)
    return fp16(top / levels), codes.long()


def fit_q4_k(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``quantize_row_q4_K_ref``'s parameters: ``(d, dmin, sc, m)``, ``sc``/``m`` [rows, 8]
    6-bit codes; a sub-block dequantizes as ``d * sc * q - dmin * m``."""
    rows = w.shape[0]
    x = _lanes(w, 32)
    xt = _columns(x)
    av_x = torch.sqrt((_seq_sum(xt * xt) / 32).double()).float()  # torch's float32 sqrt is inexact
    scales, mins = make_qkx2_quants(x, av_x[:, None] + x.abs(), 15, -1.0, 0.1, 20, False)
    d, sc = _quantize_scales(scales.reshape(rows, 8), 63, wrap=True)
    dmin, m = _quantize_scales(mins.reshape(rows, 8), 63, wrap=True)
    return d, dmin, sc, m


def fit_q2_k(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``quantize_row_q2_K_ref``'s parameters: ``(d, dmin, sc, m)``, ``sc``/``m`` [rows, 16]
    4-bit codes. (llama.cpp does not clamp these codes; ``max / 15`` makes them ``<= 15``
    anyway, and the clamp here only guards a negative scale, which llama.cpp would corrupt.)"""
    rows = w.shape[0]
    x = _lanes(w, 16)
    scales, mins = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
    d, sc = _quantize_scales(scales.reshape(rows, 16), 15, wrap=False)
    dmin, m = _quantize_scales(mins.reshape(rows, 16), 15, wrap=False)
    return d, dmin, sc, m
