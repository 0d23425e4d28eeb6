"""L_hybrid with v-prediction (the bundled model's parameterisation, Salimans & Ho 2022): the L_vlb term depends on the
network only through x0_hat and the head, so a v output and the eps output of the same x0_hat give the same L_t; the
L_simple part regresses the v target; the stop-gradient still keeps L_vlb off the prediction channels."""

import torch

from ldm.diffusion import parameterization as P
from ldm.diffusion import process as Dm
from ldm.diffusion.losses import hybrid_loss, vlb_term
from ldm.diffusion.schedule import NoiseSchedule

F64 = torch.float64
AC = NoiseSchedule(num_train_timesteps=50, beta_start=0.002, beta_end=0.3).alphas_cumprod().double()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 7, 30, 49])
    x_t = Dm.q_sample(x0, t, AC, noise)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=F64)  # an imperfect network
    head = torch.rand(x0.shape, generator=g, dtype=F64) * 2 - 1
    ab = AC[t].view(-1, 1, 1, 1)
    v_hat = P.v_from_x0_eps(P.x0_from_eps(x_t, eps_hat, ab), eps_hat, ab)
    return x0, noise, t, x_t, eps_hat, v_hat, head, ab


def test_vlb_term_of_a_v_output_equals_that_of_the_same_eps_output() -> None:
    x0, _, t, x_t, eps_hat, v_hat, head, _ = _batch(0)
    for variance in ("learned_range", "fixed_small", "fixed_large"):
        heads = [head] if variance == "learned_range" else []
        by_v = vlb_term(torch.cat([v_hat, *heads], 1), x0, x_t, t, AC, prediction="v_prediction", variance=variance)
        by_eps = vlb_term(torch.cat([eps_hat, *heads], 1), x0, x_t, t, AC, prediction="epsilon", variance=variance)
        torch.testing.assert_close(by_v, by_eps, rtol=1e-9, atol=1e-12)


def test_hybrid_loss_with_v_prediction_regresses_v_and_stops_the_mean_gradient() -> None:
    """L_hybrid = mean (v_hat - v)^2 + lambda T L_t with v = sqrt(ab) eps - sqrt(1 - ab) x0 (closed form, 1e-12);
    the L_t part sends no gradient to the v channels and some to the head."""
    x0, noise, t, x_t, _, v_hat, head, ab = _batch(1)
    out = torch.cat([v_hat, head], 1).requires_grad_(True)
    loss, term = hybrid_loss(out, x0, noise, x_t, t, AC, prediction="v_prediction", lam=0.001)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    simple = (out[:, :3] - v).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, simple + 0.001 * 50 * term, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad((loss - simple).sum(), out)
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0
