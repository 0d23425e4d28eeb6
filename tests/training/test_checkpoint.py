"""EMA math, checkpoint round trips and crash safety, RNG capture, condition dropout rate, config validation."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from ldm.training.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume,
                            rng_state, save_checkpoint, set_rng_state, slot_generators)
from ldm.config import ConfigError
from ldm.training.ema import EMA, EMAConfig, ema_decay
from ldm.diffusion.losses import timestep_bias_weights
from ldm.training.diffusion_step import DiffusionStep, dropout_mask
from ldm.training.config import OptimConfig, TrainConfig, build_lr_scheduler, build_optimizer, load_train_config

BASE = {"model": {"unet": "unet-tiny.yaml", "vae": "vae-tiny.yaml", "text": {}},
        "data": {"path": "/nonexistent-is-fine-for-config"}}


# ------------------------------------------------------------------------------------------------------------ EMA


def _walk(model: nn.Module, k: int) -> None:
    """Deterministic parameter change number k (float64)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * (k + 1) + i))


def test_ema_constant_decay_matches_closed_form():
    """warmup=none: s_n = d^n s_0 + (1 - d) sum_k d^(n-k) p_k for updates k = 2..n (update 1 copies: decay 0)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    d, n = 0.9, 7
    ema = EMA(model, EMAConfig(decay=d, warmup="none"), dtype=torch.float64)
    history = []
    for k in range(1, n + 1):
        _walk(model, k)
        history.append([p.detach().clone() for p in model.parameters()])
        ema.update(model)
    # update 1 has decay 0 (diffusers: n = k - 1 <= 0), so s_1 = p_1; then s_n = d^(n-1) p_1 + (1-d) sum_{k>=2} d^(n-k) p_k
    for j, s in enumerate(ema.shadow):
        expected = d ** (n - 1) * history[0][j] + sum((1 - d) * d ** (n - k) * history[k - 1][j] for k in range(2, n + 1))
        assert torch.allclose(s, expected, atol=1e-14, rtol=0), (s - expected).abs().max()


@pytest.mark.parametrize("warmup", ["none", "simple"])
def test_ema_update_every_is_the_ema_of_every_mth_state_with_the_same_decays(warmup):
    """update_every = m: after step k = jm the shadow is m plain updates towards p_k, from the shadow at step
    (j - 1)m: the closed form prod(d) s + (1 - prod(d)) p_k; between those steps it does not move; a copy resumed
    mid-window from state_dict() ends on the same bits."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    cfg = EMAConfig(decay=0.9, warmup=warmup, update_every=3)
    ema = EMA(model, cfg, dtype=torch.float64)
    expected = [s.clone() for s in ema.shadow]
    resumed = None
    for k in range(1, 13):
        _walk(model, k)
        before = [s.clone() for s in ema.shadow]
        ema.update(model)
        if resumed is not None:
            resumed.update(model)
        if k % 3:
            assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before))
        else:
            prod = math.prod(ema_decay(j, cfg) for j in range(k - 2, k + 1))
            expected = [prod * e + (1 - prod) * q.detach() for e, q in zip(expected, model.parameters())]
            assert all(torch.allclose(a, b, atol=1e-14, rtol=0) for a, b in zip(ema.shadow, expected))
        if k == 7:  # mid-window: the pending product travels with the state
            resumed = EMA(model, cfg, dtype=torch.float64)
            resumed.load_state_dict(ema.state_dict())
            assert resumed.pending == ema.pending != 1.0
    assert all(torch.equal(a, b) for a, b in zip(resumed.shadow, ema.shadow))
    with pytest.raises(ValueError, match="update_every"):
        EMAConfig(update_every=0)


@pytest.mark.parametrize("warmup,kwargs", [("simple", {}), ("power", {"use_ema_warmup": True, "power": 0.75})])
def test_ema_matches_diffusers_ema_model(warmup, kwargs):
    """Same decay sequence and shadow weights as diffusers.training_utils.EMAModel (float64, exact)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    cfg = EMAConfig(decay=0.95, warmup=warmup, power=kwargs.get("power", 2 / 3), update_after_step=2, min_decay=0.1)
    ours = EMA(model, cfg, dtype=torch.float64)
    ref = EMAModel(model.parameters(), decay=0.95, update_after_step=2, min_decay=0.1, foreach=False, **kwargs)
    for k in range(1, 30):
        _walk(model, k)
        ours.update(model)
        ref.step(model.parameters())
        assert ours.decay == ref.cur_decay_value
    for a, b in zip(ours.shadow, ref.shadow_params):
        assert torch.equal(a, b)


def test_ema_update_is_the_per_tensor_formula_bit_for_bit():
    """The update is s - (1 - d) (s - p) per tensor, also for a float32 shadow of bf16 weights."""
    from ldm.training.ema import ema_update_

    g = torch.Generator().manual_seed(0)
    shadow = [torch.randn(n, 7, generator=g) for n in (1, 5, 300)]
    params = [torch.randn(s.shape, generator=g).to(dtype) for s, dtype in zip(shadow, (torch.float32, torch.bfloat16,
                                                                                       torch.float32))]
    for decay in (0.0, 0.3, 0.999):
        expected = [s - (1.0 - decay) * (s - p.to(s.dtype)) for s, p in zip(shadow, params)]
        ema_update_(shadow, params, decay)
        assert all(torch.equal(s, e) for s, e in zip(shadow, expected))
    with pytest.raises(ValueError, match="2 shadow tensors for 3 parameters"):
        ema_update_(shadow[:2], params, 0.5)


def test_ema_decay_warmups_and_store_restore():
    cfg = EMAConfig(decay=0.999, warmup="simple")
    assert ema_decay(1, cfg) == 0.0 and ema_decay(2, cfg) == pytest.approx(2 / 11) and ema_decay(10**6, cfg) == 0.999
    model = nn.Linear(2, 2)
    ema = EMA(model, EMAConfig(decay=0.5, warmup="none"))
    before = [p.detach().clone() for p in model.parameters()]
    ema.update(model)
    _walk(model, 3)
    ema.update(model)
    after = [p.detach().clone() for p in model.parameters()]
    ema.store(model)
    ema.copy_to(model)
    for p, s, b, a in zip(model.parameters(), ema.shadow, before, after):
        assert torch.equal(p, s) and torch.allclose(s, 0.5 * b + 0.5 * a)
    ema.restore(model)
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)


def test_ema_swapped_holds_the_ema_weights_inside_and_restores_even_on_error():
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.5, warmup="none"))
    _walk(model, 1)
    ema.update(model)
    own = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(p, s) for p, s in zip(own, ema.shadow))  # so the test can tell the two apart
    with ema.swapped(model) as m:
        assert m is model and all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), own))
    with pytest.raises(KeyError), ema.swapped(model):
        raise KeyError("validation failed")
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), own))


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    from ldm.random import seeded

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        a = nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues as if nothing was drawn
    with seeded(7):
        b = nn.Linear(4, 4).weight.detach().clone()
    with seeded(8):
        c = nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_metrics_logger_drops_rows_past_the_resumed_step_atomically(tmp_path):
    from ldm.training.loop import MetricsLogger

    path = tmp_path / "losses.csv"
    log = MetricsLogger(path)
    for step in range(1, 5):
        log.log(step, {"loss": step / 10})
    log.close()
    log = MetricsLogger(path, resume_step=2)
    log.log(3, {"loss": 0.5})
    log.close()
    assert path.read_text().splitlines() == ["step,loss", "1,0.1", "2,0.2", "3,0.5"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []  # no temporary file left


def test_folder_digest_changes_with_any_byte_and_ignores_temporaries(tmp_path):
    from ldm.training.checkpoint import folder_digest

    a = tmp_path / "a"
    (a / "vae").mkdir(parents=True)
    (a / "vae/config.json").write_text('{"x": 1}')
    (a / "model_index.json").write_text("{}")
    first = folder_digest(a)
    shutil.copytree(a, tmp_path / "b")
    assert folder_digest(tmp_path / "b") == first  # content, not location
    (a / ".vae.123.tmp").write_text("half written")
    assert folder_digest(a) == first
    (a / "vae/config.json").write_text('{"x": 2}')
    assert folder_digest(a) != first
    (a / "vae/config.json").write_text('{"x": 1}')
    (a / "vae/config.json").rename(a / "vae/other.json")  # same bytes under another name
    assert folder_digest(a) != first


# -------------------------------------------------------------------------------------------------- checkpoints


def _tiny_run(seed: int = 0, fused: bool = False, ema_every: int = 1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = build_optimizer(list(model.parameters()),
                          OptimConfig(lr=1e-2, warmup_steps=2, lr_scheduler="cosine", fused=fused))
    sched = build_lr_scheduler(opt, OptimConfig(lr=1e-2, warmup_steps=2, lr_scheduler="cosine"), 10)
    return model, opt, sched, EMA(model, EMAConfig(decay=0.9, update_every=ema_every))


def _train(model, opt, sched, ema, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(4, 3, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)


def _save(root, step, model, opt, sched, ema, keep_last=None):
    return save_checkpoint(root, step, models={"net": model}, emas={"net": ema}, optimizers={"net": opt},
                           schedulers={"net": sched}, rng_states=[rng_state()], meta={"data": {"epoch": 0}},
                           keep_last=keep_last)


@pytest.mark.parametrize("ema_every", [1, 2])
def test_checkpoint_round_trip_continues_bitwise(tmp_path, ema_every):
    """Save after 3 steps, load into fresh objects, 3 more steps: bitwise equal to 6 uninterrupted steps (with
    ema.update_every 2 the checkpoint falls mid-window: its pending decay product is saved too)."""
    a = _tiny_run(ema_every=ema_every)
    _train(*a, 6)
    b = _tiny_run(ema_every=ema_every)
    _train(*b, 3)
    path = _save(tmp_path, 3, *b)
    c = _tiny_run(seed=123, ema_every=ema_every)  # different initial weights: everything must come from the checkpoint
    meta = load_checkpoint(path, models={"net": c[0]}, emas={"net": c[3]}, optimizers={"net": c[1]},
                           schedulers={"net": c[2]})
    assert meta["step"] == 3 and meta["data"] == {"epoch": 0}
    _train(*c, 3, start=3)
    for p, q in zip(a[0].parameters(), c[0].parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a[3].shadow, c[3].shadow):
        assert torch.equal(p, q)
    assert a[2].get_last_lr() == c[2].get_last_lr() and a[3].num_updates == c[3].num_updates == 6


def test_fused_adamw_takes_the_reference_steps_and_resumes_bitwise(tmp_path):
    """optim.fused: torch's fused AdamW kernel follows the per-parameter loop to float32 rounding over 6 steps, and a
    fused run saved at step 3 and resumed continues bitwise."""
    ref, fused = _tiny_run(), _tiny_run(fused=True)
    assert fused[1].defaults["fused"] and not ref[1].defaults["fused"]
    _train(*ref, 6)
    _train(*fused, 6)
    for p, q, init in zip(ref[0].parameters(), fused[0].parameters(), _tiny_run()[0].parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()
        assert (p - init).abs().max() > 1e-3  # the steps moved the weights
    b = _tiny_run(fused=True)
    _train(*b, 3)
    c = _tiny_run(seed=123, fused=True)
    load_checkpoint(_save(tmp_path, 3, *b), models={"net": c[0]}, emas={"net": c[3]}, optimizers={"net": c[1]},
                    schedulers={"net": c[2]})
    _train(*c, 3, start=3)
    for p, q in zip(fused[0].parameters(), c[0].parameters()):
        assert torch.equal(p, q)


def test_rng_state_round_trip():
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_half_written_checkpoint_is_never_latest_and_pruning(tmp_path):
    run = _tiny_run()
    for step in (1, 2, 3):
        _save(tmp_path, step, *run)
    # what a crash can leave behind: atomic_directory's temporary folder, and (defensively) a folder without meta.json
    (tmp_path / ".step-00000004.abc.tmp").mkdir()
    (tmp_path / ".step-00000004.abc.tmp" / "net.safetensors").write_bytes(b"truncated")
    shutil.copytree(tmp_path / "step-00000003", tmp_path / "step-00000005")
    (tmp_path / "step-00000005" / "meta.json").unlink()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step-00000003"
    assert resolve_resume(tmp_path / "none-yet", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "step-00000005"))
    _save(tmp_path, 6, *run, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    assert not (tmp_path / ".step-00000004.abc.tmp").exists()


def test_optimizer_state_is_loaded_without_pickle_code(tmp_path):
    """optimizer/schedule/RNG files load under torch.load(weights_only=True) (no arbitrary unpickling)."""
    path = _save(tmp_path, 1, *_tiny_run())
    for name in ("net.optim.pt", "rng-0.pt"):
        torch.load(path / name, weights_only=True)


# ------------------------------------------------------------------------------------------------ randomness


def test_slot_generators_depend_only_on_seed_step_micro_slot():
    a = [torch.rand(2, generator=g) for g in slot_generators(0, 5, 1, range(4))]
    b = [torch.rand(2, generator=g) for g in slot_generators(0, 5, 1, range(2, 4))]  # process 1 of 2, batch 2
    assert torch.equal(a[2], b[0]) and torch.equal(a[3], b[1])
    c = [torch.rand(2, generator=g) for g in slot_generators(0, 6, 1, range(4))]
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_condition_dropout_rate_matches_p(p):
    """Fraction of dropped captions over n = 20000 draws within 4 binomial standard deviations of p."""
    n = 20000
    mask = dropout_mask(slot_generators(3, 0, 0, range(n)), p)
    tol = 4 * math.sqrt(p * (1 - p) / n)  # 0.0085 for p = 0.1
    assert abs(mask.float().mean().item() - p) < tol
    assert not dropout_mask(slot_generators(3, 0, 0, range(50)), 0.0).any()
    assert dropout_mask(slot_generators(3, 0, 0, range(50)), 1.0).all()


def test_biased_timesteps_follow_their_distribution_and_uniform_is_unchanged():
    """objective.timestep_bias: t drawn from w / sum(w) per example generator. later x3 on half: P(t >= 500) = 3/4
    within 4 binomial sds over 20000 draws; multiplier 0 outside [200, 300) never leaves it; none = randint(0, T)."""
    n, T = 20000, 1000
    draw = lambda w, m: DiffusionStep.timesteps(  # noqa: E731
        type("S", (), {"t_weights": w, "alphas_cumprod": torch.zeros(T), "variance_objective": None})(), slot_generators(4, 0, 0, range(m)))
    t = draw(timestep_bias_weights(T, "later", 3.0, 0.5), n)
    assert abs((t >= 500).double().mean().item() - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    assert abs((t[t < 500] < 250).double().mean().item() - 0.5) < 0.05  # uniform within a block
    hole = draw(timestep_bias_weights(T, "range", 0.0, begin=200, end=300), 2000)
    assert not ((hole >= 200) & (hole < 300)).any() and hole.min() < 200 and hole.max() >= 300
    uniform = draw(None, 50)
    assert torch.equal(uniform, torch.cat([torch.randint(0, T, (1,), generator=g)
                                           for g in slot_generators(4, 0, 0, range(50))]))


def test_timestep_bias_config_errors_name_the_key():
    cfg = load_train_config(TrainConfig, "train-tiny.yaml", ["objective.timestep_bias.strategy=later",
                                                                     "objective.timestep_bias.multiplier=3"])
    assert cfg.objective.timestep_bias.multiplier == 3.0 and cfg.objective.timestep_bias.portion == 0.25
    for bad, key in (("strategy=late", "strategy"), ("multiplier=-1", "multiplier"), ("portion=0", "portion")):
        with pytest.raises(ConfigError, match=key):
            load_train_config(TrainConfig, "train-tiny.yaml", [f"objective.timestep_bias.{bad}"])


# ---------------------------------------------------------------------------------------------------- configs


def test_train_config_yaml_and_overrides():
    cfg = load_train_config(TrainConfig, "train-tiny.yaml", ["optim.lr=1e-3", "run.max_steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.run.max_steps == 7 and cfg.objective.condition_dropout == 0.1
    assert cfg.model.text.hidden_size == 32 and cfg.model.schedule.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], r"unknown key\(s\) \['lrr'\]"),
    (["run.mixed_precision=fp8"], "mixed_precision.*fp8"),
    (["objective.prediction_type=score"], "prediction_type"),
    (["objective.condition_dropout=1.5"], "condition_dropout"),
    (["run.batch_size=0"], "batch_size"),
    (["model.pretrained=/some/folder"], "model.pretrained is set"),
    (["run.cache_latents=true", "data.random_flip=true"], "cache_latents"),
    (["optim.betas=[0.9]"], "betas"),
    (["ema.decay=2"], "ema.decay"),
])
def test_bad_config_names_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(TrainConfig, None, overrides, base=BASE)


def test_missing_model_section_is_named():
    with pytest.raises(ConfigError, match="missing required key.*model"):
        load_train_config(TrainConfig, None, [], base={"data": BASE["data"]})
    with pytest.raises(ConfigError, match=r"needs model\.\['text'\]"):
        load_train_config(TrainConfig, None, ["model.text=null"], base=BASE)
