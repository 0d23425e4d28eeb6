"""Multistep ODE samplers: UniPC (predictor-corrector on x0_hat) and linear multistep (LMS) on dx/dsigma.

Both reuse the model evaluations of earlier steps, one evaluation per step (NFE = steps). Sigma space
(docs/CONVENTIONS.md), lambda = -log sigma: the VP log-SNR of Lu et al. and Zhao et al. is log(alpha / sigma_vp) =
-log sigma, so their VP updates divided by alpha_t are the ones below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ldm.diffusion.sampling import Callback, Denoiser, check_sigmas, denoise, to_d
from ldm.random import Generator

BhVariant = Literal["bh1", "bh2"]


def unipc_coefficients(rks: Sequence[float], h: float, variant: BhVariant, corrector: bool) -> list[float]:
    """UniPC's rho (Zhao et al. 2023, UniP-p / UniC-p with B(h)): R_p rho = g_p with R_p[i, k] = r_k^(i - 1) and
    g_p[i] = (-h) phi_(i+1)(-h) i! / B(h), phi_1(z) = (e^z - 1) / z, phi_(k+1)(z) = (phi_k(z) - 1/k!) / z;
    B(h) = expm1(-h) ("bh2") or -h ("bh1"). rks: r_k = (lambda_k - lambda_s) / h of the earlier points, then 1.
    The predictor (UniP) solves the system without its last row and column, the corrector (UniC) the whole; order 2
    of UniP and order 1 of UniC take rho = 1/2, as the authors' code and diffusers do."""
    p = len(rks)
    if (p == 2 and not corrector) or (p == 1 and corrector):
        return [0.5]
    hh = -h
    b_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi, factorial, g = math.expm1(hh) / hh - 1, 1, []  # h_phi: hh * phi_2(hh)
    for i in range(1, p + 1):
        g.append(h_phi * factorial / b_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial  # hh * phi_(i+2)(hh)
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, p + 1)], dtype=torch.float64)
    g_t = torch.tensor(g, dtype=torch.float64)
    if not corrector:
        R, g_t = R[:-1, :-1], g_t[:-1]
    return torch.linalg.solve(R, g_t).tolist()


def _unipc_update(x: torch.Tensor, sigma: float, sigma_next: float, history: list[tuple[float, torch.Tensor]],
                  variant: BhVariant, denoised_next: torch.Tensor | None) -> torch.Tensor:
    """x at sigma_next from x at sigma: the predictor (denoised_next None) or, with D(x_pred, sigma_next), the corrector
    (Zhao et al. 2023, data prediction): x' = (sigma' / sigma) x - expm1(-h) m0 - B(h) sum_k rho_k D1_k with
    D1_k = (m_k - m0) / r_k over the (lambda, x0_hat) `history` (m0 at sigma last), and for UniC also
    rho_last (D(x_pred) - m0)."""
    lam0, m0 = history[-1]
    if sigma_next == 0:
        return m0  # lambda' = inf: the first-order step lands on x0_hat
    h = math.log(sigma / sigma_next)
    earlier = history[:-1][::-1]  # nearest first
    rks = [(lam - lam0) / h for lam, _ in earlier]
    d1s = [(m - m0) / r for r, (_, m) in zip(rks, earlier)]
    b_h = math.expm1(-h) if variant == "bh2" else -h
    out = (sigma_next / sigma) * x - math.expm1(-h) * m0
    if denoised_next is not None:
        rhos = unipc_coefficients(rks + [1.0], h, variant, corrector=True)
        d1s = d1s + [denoised_next - m0]
    elif d1s:
        rhos = unipc_coefficients(rks + [1.0], h, variant, corrector=False)
    else:
        return out
    return out - b_h * sum(rho * d for rho, d in zip(rhos, d1s))


@torch.no_grad()
def sample_unipc(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, order: int = 2, variant: BhVariant = "bh2",
    disable_corrector: Sequence[int] = (),
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, multistep UniPC-p): UniP-p predicts x at the next sigma from the last p x0_hat; at the
    next step UniC-p corrects it with that step's own x0_hat, so the corrector costs no evaluation (NFE = steps).
    The order warms up from 1 and drops to 1 on the last step (diffusers' UniPCMultistepScheduler defaults:
    solver_order=2, "bh2", predict_x0, lower_order_final); disable_corrector: steps i whose result is not corrected
    at step i + 1. The x0_hat stored is that of the uncorrected x, as in the paper and diffusers."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: bh1, bh2")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    s = check_sigmas(sigmas)
    n = len(s) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0_hat) of the last `order` steps, oldest first
    x_prev, p_prev = x, 0
    for i in range(n):
        denoised = denoise(model, x, s[i], cond, i)
        if i > 0 and i - 1 not in disable_corrector:
            x = _unipc_update(x_prev, s[i - 1], s[i], history[-p_prev:], variant, denoised)
        history = (history + [(-math.log(s[i]), denoised)])[-order:]
        p = min(order, i + 1, n - i)
        x_prev, p_prev = x, p
        x = _unipc_update(x, s[i], s[i + 1], history[-p:], variant, None)
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


def lms_coefficients(nodes: Sequence[float], upper: float) -> list[float]:
    """c_j = integral from nodes[-1] to `upper` of l_j(tau) d tau, l_j the Lagrange basis polynomial of the nodes (the
    sigmas of the last derivatives, oldest first): the linear multistep weights of k-diffusion's and diffusers' LMS,
    integrated exactly (they use scipy's quad), in u = tau - nodes[-1] so that large sigmas do not cancel."""
    base, end = nodes[-1], upper - nodes[-1]
    coeffs = []
    for j, node in enumerate(nodes):
        others = [o - base for k, o in enumerate(nodes) if k != j]
        poly = [1.0]  # prod_k (u - others_k), lowest degree first
        for o in others:
            poly = [(poly[d - 1] if d > 0 else 0.0) - o * (poly[d] if d < len(poly) else 0.0)
                    for d in range(len(poly) + 1)]
        integral = sum(c * end ** (d + 1) / (d + 1) for d, c in enumerate(poly))
        coeffs.append(integral / math.prod(node - base - o for o in others))
    return coeffs


@torch.no_grad()
def sample_lms(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on a variable grid): x' = x + sum_j c_j d_j, d_j = dx/dsigma at the last
    `order` sigmas and c_j the integrals of their Lagrange polynomial over [sigma, sigma'] (`lms_coefficients`);
    k-diffusion's sample_lms and diffusers' LMSDiscreteScheduler (order 4), warming up from order 1."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    s = check_sigmas(sigmas)
    ds: list[torch.Tensor] = []  # dx/dsigma at s[i - len(ds) + 1 : i + 1]
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        ds = (ds + [to_d(x, s[i], denoised)])[-order:]
        coeffs = lms_coefficients(s[i + 1 - len(ds): i + 1], s[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, ds))
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x
