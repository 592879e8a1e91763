"""Tests of dt_grpo.py, read as the method's specification: the pure functions against
hand-computed values, the correctness conditions (exact ratios, exact resets, honoured time
limits, causality), what a rollout's score and a GRPO update are, and the user paths through
the CLI. No network is used: every
dataset is built locally under a temporary MINARI_DATASETS_PATH.

    python -m pytest -q
"""

import ast
import csv
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

import dt_grpo as D

HERE = Path(__file__).resolve().parent
# A tiny configuration: every test below runs in seconds on 2 CPU cores.
TINY = dict(context_len=5, embed_dim=32, n_layer=2, n_head=2, group_size=4, reset_points=3, traj_len=6,
            eval_len=10, minibatch_size=4, epochs=1, eval_episodes=2, random_dataset_steps=2000)
TINY_FLAGS = ["--context-len", "5", "--embed-dim", "32", "--n-layer", "2", "--n-head", "2", "--group-size", "4",
              "--reset-points", "3", "--traj-len", "6", "--eval-len", "10", "--minibatch-size", "4",
              "--epochs", "1", "--eval-episodes", "2", "--random-dataset-steps", "2000", "--pretrain-steps", "20",
              "--batch-size", "8"]


@pytest.fixture(scope="session")
def minari_dir(tmp_path_factory):
    """A private Minari root holding local/hopper-random-v0 (2000 random steps)."""
    root = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    D.build_random_dataset("local/hopper-random-v0", "Hopper-v4", 2000, seed=0)
    D.build_random_dataset("test/hopper-random-v0", "Hopper-v4", 300, seed=0)  # a cached non-local dataset
    D.build_random_dataset("local/halfcheetah-random-v0", "HalfCheetah-v4", 1000, seed=0)  # one 1000-step episode
    return root


@pytest.fixture(scope="session")
def setup(minari_dir):
    """Args, env pool, data and an untrained tiny model (eval mode)."""
    args = D.Args(dataset="local/hopper-random-v0", **TINY)
    env = D.make_env("Hopper-v4")
    data, _ = D.load_data(args, env)
    torch.manual_seed(0)
    model = D.make_model(args, 11, 3, env.spec.max_episode_steps).eval()
    envs = [D.make_env("Hopper-v4") for _ in range(args.reset_points * args.group_size)]
    return args, envs, data, model


def within(delta, tol, what: str) -> None:
    """|Δ| <= tol, elementwise (tol a number or a tensor of Δ's shape), printed either way:
    `pytest -s -k "<tests>" | grep '|Δ|'` lists each exactness test's worst |Δ| and its margin."""
    delta = torch.as_tensor(delta).abs().double()
    tol = torch.as_tensor(tol).double().expand_as(delta)
    margin = torch.where(delta > 0, tol / delta, math.inf)
    i = margin.argmin()
    print(f"\n|Δ| {what}: worst {delta.max().item():.3g}; tightest: {delta.flatten()[i].item():.3g} against "
          f"{tol.flatten()[i].item():.3g}, margin {margin.min().item():.3g}x")
    assert (delta <= tol).all(), f"{what}: |Δ| {delta.flatten()[i].item():.3g} > tolerance {tol.flatten()[i].item():.3g}"


# A tolerance is a claim about rounding, and holds on every CPU (ALGORITHM.md §2.6): two paths that
# compute the same function sum in another order (another kernel, another shape), so their results
# differ in the last bits. A float sum of n terms of like size is off by at most ~n ulps of its size, and
# the widest sum in the model is the MLP's, of 4E terms: the policy's outputs differ by <= 4E ulps.
def ulps(model, dtype) -> float:
    """4E units in the last place of `dtype` at 1: the rounding of one pass of the model."""
    return 4 * model.embed_state.out_features * torch.finfo(dtype).eps


def log_ratio_tolerance(model, batch, mode: str) -> torch.Tensor:
    """The rounding bound of log ρ before any update, from that of the outputs μ, log σ: to first order,
    log π(a) moves by Σ_A |z|/σ δμ + |z² - 1| δlog σ inside the bounds, with z = (atanh a - μ)/σ and
    δ = ulps x max(1, |.|); at a bound (z = (u_b - μ)/σ there) log Φ(-z) moves by at most (|z| + 1)/σ δμ +
    (|z| + 1)|z| δlog σ (Mills' ratio); (|z| + 1)/σ δμ + (z² + |z| + 1) δlog σ covers both. log ρ sums (joint),
    averages (mean) or keeps (token) that over the sampled steps."""
    rows, L = torch.arange(len(batch.t0)), batch.valid.shape[1]
    with torch.no_grad():  # the policy at the sampled steps, as batch_log_probs computes it
        dist, _ = model(batch.ep.segment(rows, batch.t0, L),
                        model.context(batch.ep.segment(rows, batch.t0 - model.burn_in, model.burn_in)))
    a = batch.ep.segment(rows, batch.t0, L).actions.to(dist.mean.dtype).clamp(-D.ACTION_BOUND, D.ACTION_BOUND)
    sigma = dist.log_std.exp()
    z = (torch.atanh(a) - dist.mean) / sigma
    delta = ulps(model, dist.mean.dtype)
    per_action = delta * ((z.abs() + 1) / sigma * dist.mean.abs().clamp(min=1) + (z**2 + z.abs() + 1) * dist.log_std.abs().clamp(min=1))
    return D.log_ratios(per_action.sum(-1), torch.zeros(()), batch.valid.double(), mode)


def main(capsys, *flags) -> tuple[int, str]:
    """The CLI in this process, where a new interpreter adds nothing but its start-up: exit code and stderr."""
    code = D.main([str(f) for f in flags])
    return code, capsys.readouterr().err


def files(root: Path) -> dict:
    """Every file below root, with its bytes: to show that nothing was changed."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*flags, env=None):
    """`python dt_grpo.py FLAGS` in a new interpreter, as a user runs it."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, str(HERE / "dt_grpo.py"), *flags], capture_output=True, text=True,
                          env=e, timeout=600)


# ---------------------------------------------------------------------------------------------
# Pure functions against hand-computed values
# ---------------------------------------------------------------------------------------------
def test_returns_to_go_hand_example():
    rtg = D.returns_to_go(torch.tensor([[1.0, 2.0, 3.0, -1.0], [0.0, 0.0, 1.0, 0.0]]))
    assert rtg.tolist() == [[5.0, 4.0, 2.0, -1.0], [1.0, 1.0, 1.0, 0.0]]


def test_gather_segment_hand_example():
    """Two sequences stored flat (rows 0-3 and 4-8); segments of 3 steps, one reaching before
    step 0 (padding there) and one past the last known step (padding there too)."""
    rtg = torch.arange(9.0)
    states = torch.arange(9.0)[:, None].repeat(1, 2)
    actions = 10 + torch.arange(9.0)[:, None]
    seg = D.gather_segment(rtg, states, actions, start=torch.tensor([0, 4]), last=torch.tensor([3, 2]),
                           first=torch.tensor([-1, 1]), n=3)
    assert seg.valid.tolist() == [[False, True, True], [True, True, False]]
    assert seg.timesteps.tolist() == [[0, 0, 1], [1, 2, 2]]  # padding points at a real step
    assert seg.rtg[seg.valid].tolist() == [0.0, 1.0, 5.0, 6.0]
    assert seg.actions[seg.valid][:, 0].tolist() == [10.0, 11.0, 15.0, 16.0]
    assert seg.prev_actions[seg.valid][:, 0].tolist() == [0.0, 10.0, 14.0, 15.0]  # a_{t-1}; zero at t = 0


def test_dataset_segments_stay_inside_one_episode(setup):
    _, _, data, _ = setup
    seg = data.sample(256, 5, torch.Generator().manual_seed(0))
    assert seg.valid[:, -1].all()  # the last step of a segment is always real
    t = seg.timesteps.masked_fill(~seg.valid, -1)
    real = seg.valid[:, :-1]
    assert ((t[:, 1:] - t[:, :-1])[real] == 1).all()  # consecutive steps of one episode, never across a boundary
    assert not seg.valid.all()  # and some segments reach before their episode's start


def test_group_advantages_hand_example():
    adv = D.group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    s = math.sqrt(1.5)  # (x - 2) / sqrt(2/3)
    torch.testing.assert_close(adv[0], torch.tensor([-s, 0.0, s]))
    assert adv[1].tolist() == [0.0, 0.0, 0.0]  # zero spread: no signal
    torch.testing.assert_close(adv[0].mean(), torch.tensor(0.0))
    torch.testing.assert_close(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_log_ratios_hand_example():
    new = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    old = torch.zeros(2, 3)
    valid = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(D.log_ratios(new, old, valid, "joint"), torch.tensor([0.6, 1.0]))
    torch.testing.assert_close(D.log_ratios(new, old, valid, "mean"), torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(D.log_ratios(new, old, valid, "token"), torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0]]))


def test_clipped_surrogate_hand_example():
    lr = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    # +A: gain capped at 1+eps; -A: pessimistic, the unclipped 1.5 counts; ratio 0.5: mirror image
    torch.testing.assert_close(D.clipped_surrogate(lr, adv, 0.2), torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2]))


def test_reset_points_follow_uncertainty():
    u = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    _, active = D.choose_reset_points(u, 1, "uncertainty", 1.0, gen)
    z = (u - u.mean()) / u.std()  # hand computation of the rule: softmax of the standardised profile
    torch.testing.assert_close(active, z.exp() / z.exp().sum())
    assert active.argmax() == 2 and active[4] > active[0] and active[2] > 1 / 6
    _, greedy = D.choose_reset_points(u, 1, "uncertainty", 0.2, gen)
    assert greedy[2] > active[2]
    _, uniform = D.choose_reset_points(u, 1, "uniform", 1.0, gen)
    torch.testing.assert_close(uniform, torch.full((6,), 1 / 6))
    # the draws follow the probabilities, distinct steps while the trajectory is long enough
    draws = torch.cat([D.choose_reset_points(u, 1, "uncertainty", 0.2, gen)[0] for _ in range(2000)])
    assert abs((draws == 2).float().mean().item() - greedy[2].item()) < 0.03
    t0, _ = D.choose_reset_points(u, 6, "uniform", 1.0, gen)
    assert sorted(t0.tolist()) == list(range(6))
    t0, _ = D.choose_reset_points(u[:2], 5, "uniform", 1.0, gen)  # fewer steps than reset points
    assert len(t0) == 5 and set(t0.tolist()) <= {0, 1}


@pytest.mark.parametrize("sign", [1, -1])
def test_ladder_0_bandit(sign):
    """Rung 0 of the learning ladder (docs/study.md): GRPO's loss alone, on a bandit. Groups of G
    actions from a tanh-Gaussian policy, reward -|a - a*|^2, group advantages, the clipped
    surrogate: the mean action must move to a*, and away from it with negated advantages."""
    torch.manual_seed(0)
    target = torch.tensor([0.5, -0.3])
    mean, log_std = torch.zeros(2, requires_grad=True), torch.full((2,), -1.0, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=0.05)
    policy = lambda: D.TanhNormal(mean.expand(4, 16, 2), log_std.expand(4, 16, 2))  # N=4 groups of G=16
    for _ in range(60):
        with torch.no_grad():
            a = policy().sample()  # (N, G, A): one sampled action per rollout, L = 1
            logp_old = policy().log_prob(a).view(-1, 1)
            adv = sign * D.group_advantages(-((a - target) ** 2).sum(-1)).view(-1)
        for _ in range(2):  # epochs
            loss, _ = D.grpo_policy_loss(policy().log_prob(a).view(-1, 1), logp_old, torch.ones(64, 1), adv, "mean", 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    distance = (torch.tanh(mean) - target).norm().item()
    assert distance < 0.05 if sign > 0 else distance > 1.0, distance  # it starts at 0.58


# Rung 1's task: a tiny DT pretrained on 10k uniform-random steps of InvertedPendulum-v4, 30k env steps online
LADDER = dict(env="InvertedPendulum-v4", dataset="local/invertedpendulum-random-v0", random_dataset_steps=10_000,
              context_len=5, embed_dim=32, n_layer=2, n_head=2, pretrain_steps=200, batch_size=32, online_steps=30_000,
              eval_every=10_000, eval_episodes=4, checkpoint_interval=1e9)


@pytest.mark.parametrize("sign", [1, -1])
def test_ladder_1_grpo_learns_inverted_pendulum(minari_dir, tmp_path, monkeypatch, sign):
    """Rung 1 of the learning ladder: the whole method on a small MuJoCo task. From a random
    dataset, a tiny DT learns to balance InvertedPendulum-v4 within 30k env steps (~15 s): its
    evaluations after the start average more than 3x the start (one evaluation swings by half:
    docs/study.md#ladder-criterion); with negated advantages it unlearns instead."""
    real = D.group_advantages
    monkeypatch.setattr(D, "group_advantages", lambda scores, eps=1e-8: sign * real(scores, eps))
    short = dict(online_steps=10_000, eval_every=10_000) if sign < 0 else {}  # the true sign is at 80 by then
    D.run(D.Args(**{**LADDER, **short}, traj_len=10, eval_len=40, group_size=8, reset_points=8, run_dir=str(tmp_path / "run")))
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["phase"] == "eval"]
    returns = [float(r["return"]) for r in rows]
    # each step earns 1 here, so an evaluation has no falls exactly when its episodes all last 1000 steps
    assert [float(r["eval_fell"]) == 0 for r in rows] == [x == 1000 for x in returns], rows
    if sign > 0:
        assert np.mean(returns[1:]) > max(40.0, 3 * returns[0]), returns
    else:
        assert returns[-1] < returns[0], returns


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def test_tanh_normal_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(50, 3), torch.rand(50, 3) * 2 - 1.5
    dist = D.TanhNormal(mean, log_std)
    a = dist.sample().clamp(-0.99, 0.99)  # float32 atanh loses precision next to ±1
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()])
    within(dist.log_prob(a) - ref.log_prob(a).sum(-1), 1e-4, 'log_prob vs torch')


@pytest.mark.parametrize("mean", [0.4, 4.5])
def test_tanh_normal_density_and_bound_masses_sum_to_one(mean):
    """Numerical check of the change of variables and the censoring, in 1-D: ∫ π(a) da over (-b, b) plus the
    masses at ±b is 1, for a policy inside the bounds and one whose mass is mostly at +b."""
    dist = D.TanhNormal(torch.tensor([[mean]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64))
    b = D.ACTION_BOUND
    a = torch.linspace(-b + 1e-12, b - 1e-12, 400_001, dtype=torch.float64)[:, None]  # inside the bounds
    inside = torch.trapezoid(dist.log_prob(a).exp(), a[:, 0]).item()
    masses = dist.log_prob(torch.tensor([[b], [-b]], dtype=torch.float64)).exp().sum().item()
    assert masses > (0.5 if mean > 3 else 0) and abs(inside + masses - 1) < 1e-4, (inside, masses)


def test_actions_at_the_bound_keep_log_ratios_bounded():
    """A policy whose actions sit at ±1, as a DT trained on clipped-Gaussian (PPO) data: means past the
    bound, narrow stds (and one action dim inside). Its own samples and the data's ±1 keep a finite log π, and after one small update
    (Adam, lr 1e-2) every per-action log-ratio stays small. With a density at ±1 - 1e-6 instead of the
    mass at the bound, the same update moved it by 21 and 88 nats (docs/study.md#action-bounds)."""
    g = torch.Generator().manual_seed(0)
    mean0, log_std0 = torch.tensor([2.0, -6.0, 9.0]).repeat(256, 1), torch.tensor([-1.0, -3.0, -3.0]).repeat(256, 1)
    with torch.no_grad():
        sampled = D.TanhNormal(mean0, log_std0).sample(g).float()  # stored as float32, as in rollouts
    assert (sampled[:, 1:].abs() == D.ACTION_BOUND).all() and (sampled[:, 0].abs() < D.ACTION_BOUND).all()
    for a in (sampled, torch.tensor([1.0, -1.0, 1.0]).repeat(256, 1)):  # the data's actions, exactly ±1
        mean, log_std = mean0.clone().requires_grad_(True), log_std0.clone().requires_grad_(True)
        logp_old = D.TanhNormal(mean, log_std).log_prob(a).detach()
        assert torch.isfinite(logp_old).all()
        opt = torch.optim.Adam([mean, log_std], lr=1e-2)
        loss = -(D.TanhNormal(mean, log_std).log_prob(a) * torch.randn(256, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_ratio = D.TanhNormal(mean, log_std).log_prob(a) - logp_old
        assert log_ratio.abs().max() < 0.5, log_ratio.abs().max()


def random_segment(B=3, n=6, S=11, A=3, seed=0, first=0):
    """B random episodes of 60 steps stored flat, and their segments of n steps from `first`."""
    g = torch.Generator().manual_seed(seed)
    rtg, states, actions = torch.randn(B * 60, generator=g), torch.randn(B * 60, S, generator=g), torch.rand(B * 60, A, generator=g) * 2 - 1
    return D.gather_segment(rtg, states, actions, torch.arange(B) * 60, torch.full((B,), 59), torch.full((B,), first), n)


def tiny_model(K=6, n_layer=2):
    torch.manual_seed(0)
    return D.DecisionTransformer(11, 3, 1000, K, 32, n_layer, 2, 0.0).eval()


def copy(seg):
    return D.Segment(*(getattr(seg, f.name).clone() for f in dataclasses.fields(seg)))


@pytest.mark.parametrize("p", [0, 2, 4])
def test_causality(p):
    """Changing any token after s_p (a_p, and everything at steps > p) changes no output at steps <= p;
    changing s_p does change the output at p."""
    model, seg = tiny_model(), random_segment()
    changed, after = random_segment(seed=1), copy(seg)
    after.rtg[:, p + 1:], after.states[:, p + 1:], after.prev_actions[:, p + 1:] = (
        changed.rtg[:, p + 1:], changed.states[:, p + 1:], changed.prev_actions[:, p + 1:])
    with torch.no_grad():
        d0, d1 = model(seg)[0], model(after)[0]
    for name in ("mean", "log_std"):  # bit-identical: the same kernels on the same shapes, the changed keys masked
        within(getattr(d0, name)[:, : p + 1] - getattr(d1, name)[:, : p + 1], 0.0, f"causality, {name}")
    assert not torch.allclose(d0.mean[:, p + 1:], d1.mean[:, p + 1:])
    after.states[:, p] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(after)[0].mean[:, p], d0.mean[:, p])


@pytest.mark.parametrize("n_layer", [1, 2])
def test_sliding_window_and_receptive_field(n_layer):
    """Attention sees the last 3K tokens: with one layer, the action at step t depends on steps
    t-K+1..t only (its a_{t-K} token too) and on nothing before; with n layers, on nothing before
    t - n*K (the receptive field, `burn_in`), and on step t - n*(K-1) still."""
    K, t = 4, 30
    model, seg = tiny_model(K, n_layer), random_segment(n=t + 1)
    assert model.burn_in == n_layer * K
    with torch.no_grad():
        ref = model(seg)[0].mean[:, t]
        for step, influences in ((t - n_layer * K, False), (t - n_layer * K - 5, False), (t - n_layer * (K - 1), True)):
            other = copy(seg)
            other.rtg[:, step] += 1.0
            other.states[:, step] += 1.0
            moved = (model(other)[0].mean[:, t] - ref).abs().max().item()
            assert (moved > 1e-4) == influences, (step, moved)


def test_padding_is_invisible():
    """The contents of padding steps (before step 0) do not change the outputs at real steps."""
    model, seg = tiny_model(), random_segment(first=-2)
    other = copy(seg)
    other.states[:, :2], other.rtg[:, :2], other.prev_actions[:, :3] = 5.0, 5.0, 0.5  # a_{-1} is padding too
    assert seg.valid.tolist()[0] == [False, False, True, True, True, True]
    with torch.no_grad():
        within(model(seg)[0].mean[:, 2:] - model(other)[0].mean[:, 2:], 0.0, "padding")  # bit-identical, as causality


@pytest.mark.parametrize("first", [0, 40])
def test_cached_steps_equal_one_pass(first):
    """A rollout runs one step at a time from its cache (rebuilt from the burn-in steps before the
    first); a single pass over the whole segment gives the same policy, before and after the band
    (3K tokens) has filled and deep into an episode; so does the update's pass over the n steps
    after the cache (blocked attention behind a cache)."""
    model = tiny_model(K=4, n_layer=2)
    n = 20
    full = random_segment(n=model.burn_in + n, first=first - model.burn_in)
    with torch.no_grad():
        ref = model(full)[0]
        _, cache = model(random_segment(n=model.burn_in, first=first - model.burn_in))
        after_cache = model(random_segment(n=n, first=first), cache)[0]
        tol = ulps(model, torch.float32) * ref.mean[:, model.burn_in:].abs().clamp(min=1)
        within(after_cache.mean - ref.mean[:, model.burn_in:], tol, "one pass behind the cache, mean")
        means, log_stds = [], []
        for t in range(first, first + n):
            dist, cache = model(random_segment(n=1, first=t), cache)
            means.append(dist.mean[:, 0])
            log_stds.append(dist.log_std[:, 0])
    for name, steps in (("mean", means), ("log_std", log_stds)):
        want = getattr(ref, name)[:, model.burn_in:]
        within(torch.stack(steps, 1) - want, ulps(model, torch.float32) * want.abs().clamp(min=1), f"cached steps, {name}")


# ---------------------------------------------------------------------------------------------
# Exact resets and time limits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["Hopper-v4", "Hopper-v5", "Walker2d-v4", "Walker2d-v5",
                                    "HalfCheetah-v4", "HalfCheetah-v5", "Ant-v4", "Ant-v5"])
def test_snapshot_restore_is_bit_exact(env_id):
    env, other = D.make_env(env_id), D.make_env(env_id)
    env.reset(seed=0), other.reset(seed=123)
    rng = np.random.default_rng(0)
    for _ in range(15):
        env.unwrapped.step(rng.uniform(-1, 1, env.action_space.shape))
    snap = D.get_snapshot(env)
    actions = rng.uniform(-1, 1, (40, *env.action_space.shape))
    first = [env.unwrapped.step(a)[:2] for a in actions]
    for target in (env, other):  # the same env, and another instance
        D.set_snapshot(target, snap)
        again = [target.unwrapped.step(a)[:2] for a in actions]
        for (o1, r1), (o2, r2) in zip(first, again):
            assert np.array_equal(o1, o2) and r1 == r2


def test_truncation_after_restore(setup):
    """Our step counter, not the TimeLimit wrapper's, ends the episode at max_episode_steps."""
    args, envs, data, model = setup
    T = envs[0].spec.max_episode_steps
    ep = D.Episodes.start(np.stack([envs[0].reset(seed=0)[0], envs[1].reset(seed=1)[0]]), 3600.0, T, data)
    snap = D.get_snapshot(envs[0])
    D.set_snapshot(envs[1], snap)  # a restored env: its wrapper's counter knows nothing
    ep.t[:] = T - 3
    out = D.rollout(model, envs[:2], ep, 50, 0, torch.Generator())
    assert out["env_steps"] == 6 and ep.t.tolist() == [T, T] and ep.done.all()


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def group_batch(setup):
    args, envs, data, model = setup
    torch.manual_seed(0)
    return D.collect_groups(args, model, envs, data, 3600.0, torch.Generator().manual_seed(0),
                            np.random.default_rng(0))


def test_collect_groups_shapes_and_group_starts(group_batch, setup):
    args, _, _, model = setup
    batch, stats = group_batch
    N, G, L = args.reset_points, args.group_size, args.traj_len
    assert batch.scores.shape == (N, G) and batch.logp_old.shape == (N * G, L) and batch.adv.shape == (N * G,)
    t0 = batch.t0.view(N, G)
    assert (t0 == t0[:, :1]).all()  # a group shares its reset point
    # a group shares the DT's inputs up to its reset point (up to a_t0, which each member samples;
    # padding may hold anything)
    seg = batch.ep.segment(torch.arange(N * G), batch.t0 - model.burn_in, model.burn_in + 1)
    m = seg.valid
    for v in (seg.states * m[..., None], seg.rtg * m, seg.timesteps * m, seg.prev_actions * m[..., None],
              (seg.actions * m[..., None])[:, :-1]):
        v = v.view(N, G, *v.shape[1:])
        assert (v == v[:, :1]).all()
    a0 = seg.actions[:, -1].view(N, G, -1)
    assert not (a0 == a0[:, :1]).all()
    assert batch.valid[:, 0].all() and stats["env_steps"] > 0


@pytest.fixture(scope="session")
def group_batch64(setup):
    """The iteration of `group_batch` with the model in float64."""
    args, envs, data, model = setup
    model64 = D.make_model(args, 11, 3, 1000).double().eval()
    model64.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    batch, _ = D.collect_groups(args, model64, envs, data, 3600.0, torch.Generator().manual_seed(0),
                                np.random.default_rng(0))
    return model64, batch


@pytest.mark.parametrize("mode", ["joint", "mean", "token"])
def test_ratio_is_one_before_any_update(group_batch64, group_batch, setup, mode):
    """log π_old, recorded step by step from the cache while acting, equals the update's one-pass
    log π_θ before any update, up to rounding: in float64, where only the inputs matter (the same
    tokens, steps and burn-in; a float32 step anywhere would cost ~1e7 float64 ulps), and per action
    at the default float32, where the cached step and the one-pass segment round differently."""
    model64, batch64 = group_batch64
    with torch.no_grad():
        logp, _ = D.batch_log_probs(model64, batch64, torch.arange(len(batch64.adv)))
    within(D.log_ratios(logp, batch64.logp_old, batch64.valid.float(), mode), log_ratio_tolerance(model64, batch64, mode),
           f"ratio before any update, float64, {mode}")
    batch, _ = group_batch
    with torch.no_grad():
        logp, _ = D.batch_log_probs(setup[3], batch, torch.arange(len(batch.adv)))
    within((logp - batch.logp_old) * batch.valid, log_ratio_tolerance(setup[3], batch, "token"),
           "ratio before any update, float32, per action")


@pytest.fixture(scope="session")
def cheetah(minari_dir):
    """A tiny model on HalfCheetah, whose episodes never end before the time limit, and a
    mean-action trajectory of it with a snapshot at every step."""
    args = D.Args(env="HalfCheetah-v4", dataset="local/halfcheetah-random-v0", **TINY)
    data, _ = D.load_data(args, D.make_env(args.env))
    torch.manual_seed(0)
    model = D.make_model(args, 17, 6, 1000).double().eval()  # float64: only the inputs matter (above)
    envs = [D.make_env(args.env) for _ in range(4)]
    snapshots = []
    traj, _ = D.play_episodes(model, envs, [0], 6000.0, data, torch.Generator(), sampled=False, snapshots=snapshots)
    return args, model, envs, traj, snapshots


def test_evaluation_counts_falls_not_the_time_limit(cheetah):
    """`evaluate`'s third output is a fall, an episode that ends before the time limit: never on HalfCheetah,
    every time for an untrained DT on Hopper (random data)."""
    args, model, envs, _, _ = cheetah
    _, _, fell = D.evaluate(args, model, envs, D.load_data(args, envs[0])[0], 6000.0)  # TINY: 2 episodes
    assert fell.tolist() == [False, False]
    hopper = D.Args(env="Hopper-v4", dataset="local/hopper-random-v0", **TINY)
    torch.manual_seed(0)
    returns, _, fell = D.evaluate(hopper, D.make_model(hopper, 11, 3, 1000).eval(), [D.make_env("Hopper-v4") for _ in range(2)],
                                  D.load_data(hopper, D.make_env("Hopper-v4"))[0], 3600.0)
    assert fell.tolist() == [True, True] and (returns < 1000).all()


@pytest.mark.parametrize("mode", ["joint", "mean", "token"])
def test_ratio_is_one_deep_in_an_episode_and_at_the_time_limit(cheetah, mode):
    """The same, for reset points within the receptive field of the episode start, past it
    (t0 > n_layer * K), and at the time limit, where a rollout is truncated and its segment runs
    past the last step."""
    args, model, envs, traj, snapshots = cheetah
    t0 = torch.tensor([3, model.burn_in + 30, 500, 997])
    ep = traj.branch(0, t0)
    for env, t in zip(envs, t0.tolist()):
        D.set_snapshot(env, snapshots[t])
    out = D.rollout(model, envs, ep, args.traj_len + args.eval_len, args.traj_len, torch.Generator().manual_seed(0))
    assert ep.t.tolist() == [19, model.burn_in + 46, 516, 1000] and out["valid"].sum(1).tolist() == [6, 6, 6, 3]
    batch = D.GroupBatch(ep, t0, out["logp"], out["valid"], torch.zeros(1, 4), torch.ones(4))
    with torch.no_grad():
        logp, _ = D.batch_log_probs(model, batch, torch.arange(4))
    within(D.log_ratios(logp, batch.logp_old, batch.valid.float(), mode), log_ratio_tolerance(model, batch, mode),
           f"ratio deep in an episode, float64, {mode}")


def test_hindsight_relabel_changes_rtg_only_and_breaks_ratios(group_batch, setup):
    args, _, _, model = setup
    batch, _ = group_batch
    ep = D.hindsight_relabel(batch.ep)
    for field in ("states", "actions", "rewards", "t", "done"):
        assert torch.equal(getattr(ep, field), getattr(batch.ep, field))
    assert not torch.equal(ep.rtg, batch.ep.rtg)
    relabeled = D.GroupBatch(ep, batch.t0, batch.logp_old, batch.valid, batch.scores, batch.adv)
    with torch.no_grad():
        logp, _ = D.batch_log_probs(model, relabeled, torch.arange(len(batch.adv)))
    assert D.log_ratios(logp, batch.logp_old, batch.valid.float(), "joint").abs().max() > 1e-3


def test_adapt_lr_hand_example():
    """RSL-RL's rule: ÷1.5 above twice the target, ×1.5 below half, unchanged between, kept in [1e-6, 1e-2]."""
    assert D.adapt_lr(3e-4, 0.05, 0.02) == pytest.approx(2e-4)
    assert D.adapt_lr(3e-4, 0.005, 0.02) == pytest.approx(4.5e-4)
    assert D.adapt_lr(3e-4, 0.03, 0.02) == 3e-4
    assert D.adapt_lr(3e-4, 0.01, 0.02) == 3e-4  # exactly half: not below it
    assert D.adapt_lr(9e-3, 0.0, 0.02) == 1e-2 and D.adapt_lr(1e-6, 1.0, 0.02) == 1e-6


@pytest.mark.parametrize("target_kl, direction", [(1e-9, -1), (1e3, 1), (0.0, 0), (None, 0)])
def test_grpo_update_adapts_the_learning_rate_to_the_kl(group_batch, setup, target_kl, direction):
    """With --target-kl each minibatch step is taken at the rate adapted to that minibatch's KL: a target far
    below any KL only lowers it, one far above only raises it; off (0) the rate is left alone."""
    args, _, _, trained = setup
    batch, _ = group_batch
    model = D.make_model(args, 11, 3, 1000)
    model.load_state_dict(trained.state_dict())
    upd_args = D.Args(**{**TINY, "target_kl": target_kl, "epochs": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    stats = D.grpo_update(upd_args, model, opt, batch, torch.Generator().manual_seed(0))
    assert np.sign(stats["lr"] - 3e-4) == direction and stats["lr"] == opt.param_groups[0]["lr"]


def test_keep_defaults_hand_example():
    """Unset flags that keep a competent DT, from the data's mean normalised return: below a fifth of expert no trust
    region and the env's `grpo` sizes; from there --target-kl 0.01 and the env's `keep` sizes (Walker2d: L_eval 400)
    for GRPO. A flag given stays."""
    keep = lambda score, **kw: (lambda a: (a.target_kl, a.eval_len))(D.keep_defaults(D.Args(**kw), score))
    assert keep(2.0) == keep(19.9, env="Walker2d-v4") == (0.0, None)
    assert keep(20.0, env="Walker2d-v4") == keep(91.2, env="Walker2d-v5") == (0.01, 400)
    assert keep(41.7) == keep(42.4, env="HalfCheetah-v4") == keep(58.7, env="Walker2d-v4", algo="qgrpo") == (0.01, None)
    assert keep(58.7, env="Walker2d-v4", target_kl=0.0, eval_len=300) == (0.0, 300) and keep(2.0, target_kl=0.02) == (0.02, None)


@pytest.mark.parametrize("dataset, keep", [("test/walker2d-random-v0", (0.0, 200)), ("test/walker2d-good-v0", (0.01, 400))])
def test_the_keep_defaults_follow_the_data(minari_dir, tmp_path, monkeypatch, capsys, dataset, keep):
    """Unset, --target-kl and --eval-len come from the data's returns: off and Walker2d's `grpo` L_eval on random
    data, 0.01 and its `keep` L_eval on data with a thousand times the rewards (mean normalised return ~54); the run
    says which, and its checkpoint (what --resume runs with) and summary hold them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not minari.storage.get_dataset_path("test/walker2d-good-v0").exists():
        D.build_random_dataset("test/walker2d-random-v0", "Walker2d-v4", 2000, seed=0)
        episodes = minari.load_dataset("test/walker2d-random-v0").iterate_episodes()
        D.write_dataset("test/walker2d-good-v0", "Walker2d-v4", [EpisodeBuffer(
            id=ep.id, observations=ep.observations, actions=ep.actions, rewards=1000 * ep.rewards, terminations=ep.terminations,
            truncations=ep.truncations, infos={}) for ep in episodes], "test", "random steps, rewards x 1000")
    i = TINY_FLAGS.index("--eval-len")
    flags = TINY_FLAGS[:i] + TINY_FLAGS[i + 2:]  # --eval-len unset
    code, err = main(capsys, "--env", "Walker2d-v4", "--dataset", dataset, "--online-steps", "0", "--run-dir",
                     tmp_path / "run", *flags)
    assert code == 0, err[-3000:]
    target_kl, eval_len = keep
    assert ("trust region: --target-kl 0.01" if target_kl else "trust region: off") + f"; --eval-len {eval_len}" in err
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["args"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (saved["target_kl"], saved["eval_len"]) == (summary["target_kl"], summary["eval_len"]) == keep
    assert (summary["data_score"] >= 20) == (target_kl > 0)


def test_grpo_update_follows_the_advantages(group_batch, setup):
    """One update raises log π of actions with positive advantage and lowers it for negative ones."""
    args, _, _, model = setup
    batch, _ = group_batch
    B = len(batch.adv)
    adv = torch.tensor([1.0, -1.0]).repeat(B // 2 + 1)[:B]
    batch = D.GroupBatch(batch.ep, batch.t0, batch.logp_old, batch.valid, batch.scores, adv)
    torch.manual_seed(0)
    model = D.make_model(args, 11, 3, 1000)
    model.load_state_dict(setup[3].state_dict())
    upd_args = D.Args(**{**TINY, "minibatch_size": B, "ent_coef": 0.0, "epochs": 1})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    D.grpo_update(upd_args, model, opt, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, _ = D.batch_log_probs(model, batch, torch.arange(B))
    change = ((logp - batch.logp_old) * batch.valid).sum(1)
    assert change[adv > 0].mean() > 0 > change[adv < 0].mean()


def test_rollout_score_covers_exactly_its_steps(group_batch, setup):
    """R_i sums the rewards of the steps rollout i took from its reset step t0: L + L_eval steps,
    fewer only if the episode terminated or reached the time limit. Checked independently by
    replaying the stored actions in a fresh env from the iteration's start state."""
    args, _, _, _ = setup
    batch, _ = group_batch
    T = 1000
    seed = int(np.random.default_rng(0).integers(2**31))  # the trajectory's start: the iteration's first draw
    env = D.make_env("Hopper-v4")
    for b in range(len(batch.adv)):
        env.reset(seed=seed)
        t0, end = int(batch.t0[b]), int(batch.ep.t[b])
        steps = [env.unwrapped.step(a) for a in batch.ep.actions[b, :end].numpy()]
        terminated = [s[2] for s in steps]
        assert not any(terminated[:-1])  # no step after a termination
        assert end - t0 == min(args.traj_len + args.eval_len, T - t0) or terminated[-1]
        rewards = torch.tensor([s[1] for s in steps[t0:]], dtype=torch.float64)
        # float32 rewards summed in float32: n roundings of at most an ulp of the running sum's size
        within(batch.scores.view(-1)[b] - rewards.sum(), len(rewards) * torch.finfo(torch.float32).eps * rewards.abs().sum(),
               "score, float32 sum of float64 rewards")


def test_actions_after_the_sampled_ones_are_the_mean_action(group_batch64, setup):
    """The L_eval scoring steps take the policy's mean action tanh(μ); the L before them are samples.
    In float64 the two paths to tanh(μ) agree to ~1e-15, so the stored (float32) action is tanh(μ)
    rounded to float32, or at most one float32 ulp from it where that rounding is a tie."""
    args = setup[0]
    model, batch = group_batch64
    rows = torch.arange(len(batch.adv))
    for j, sampled in ((0, True), (args.traj_len - 1, True), (args.traj_len, False), (args.traj_len + 3, False)):
        t = batch.t0 + j
        live = t < batch.ep.t
        assert live.any()
        with torch.no_grad():  # the policy at step t: a pass over the burn-in steps before it and t
            dist, _ = model(batch.ep.segment(rows[live], t[live] - model.burn_in, model.burn_in + 1))
            mode = torch.tanh(dist.mean[:, -1])
        taken = batch.ep.actions[rows[live], t[live]]
        if sampled:
            assert batch.valid[live, j].all() and (taken - mode).abs().max() > 1e-3
        else:
            within(taken - mode.float(), torch.finfo(torch.float32).eps, "the stored mean action, float32")


@pytest.mark.parametrize("mode", ["joint", "mean", "token"])
def test_zero_spread_group_gives_no_gradient(mode):
    adv = D.group_advantages(torch.tensor([[2.0, 2.0, 2.0, 2.0]])).view(-1)
    logp_new = torch.randn(4, 5, requires_grad=True)  # any policy, any ratio
    loss, _ = D.grpo_policy_loss(logp_new, torch.randn(4, 5), torch.ones(4, 5), adv, mode, 0.2)
    loss.backward()
    assert adv.eq(0).all() and logp_new.grad.eq(0).all()


def test_grpo_update_with_only_zero_spread_groups_changes_nothing(group_batch, setup):
    args, _, _, _ = setup
    batch, _ = group_batch
    batch = dataclasses.replace(batch, adv=torch.zeros_like(batch.adv))
    model = D.make_model(args, 11, 3, 1000)
    model.load_state_dict(setup[3].state_dict())
    D.grpo_update(args, model, torch.optim.SGD(model.parameters(), lr=1.0), batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), setup[3].state_dict().values()))


def test_entropy_bonus_raises_entropy(group_batch, setup):
    """The same update with and without the bonus: with it, the predicted std ends higher."""
    args, _, _, _ = setup
    batch, _ = group_batch
    B = len(batch.adv)
    batch = dataclasses.replace(batch, adv=torch.tensor([1.0, -1.0]).repeat(B // 2 + 1)[:B])
    seg = batch.ep.segment(torch.arange(B), batch.t0 - args.n_layer * args.context_len, 20)

    def log_std_after(ent_coef: float) -> float:
        model = D.make_model(args, 11, 3, 1000)
        model.load_state_dict(setup[3].state_dict())
        torch.manual_seed(0)
        upd_args = D.Args(**{**TINY, "minibatch_size": B, "epochs": 1, "ent_coef": ent_coef})
        D.grpo_update(upd_args, model, torch.optim.SGD(model.parameters(), lr=1e-2), batch, torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(seg)[0].log_std[seg.valid].mean().item()

    assert log_std_after(1.0) > log_std_after(0.0) + 1e-4


def test_token_ratio_weighs_each_valid_action_once():
    """token: the loss averages over valid actions (a rollout with 2 valid actions counts twice as
    much as one with 1); joint: over rollouts. At ratio 1 the surrogate is -Â."""
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([3.0, 1.0])
    for mode, loss_value, grad in (("token", -(3 + 3 + 1) / 3, [[-1.0, -1.0, 0.0], [-1 / 3, 0.0, 0.0]]),
                                   ("joint", -(3 + 1) / 2, [[-1.5, -1.5, 0.0], [-0.5, 0.0, 0.0]])):
        logp = torch.zeros(2, 3, requires_grad=True)
        loss, _ = D.grpo_policy_loss(logp, torch.zeros(2, 3), valid, adv, mode, 0.2)
        loss.backward()
        assert loss.item() == pytest.approx(loss_value)
        torch.testing.assert_close(logp.grad, torch.tensor(grad))


# ---------------------------------------------------------------------------------------------
# QGRPO: the critic, and the group scored without resets
# ---------------------------------------------------------------------------------------------
def test_critic_fits_a_known_q():
    """On a bandit (every transition terminal), TD3's target is r itself: the twin critics fit
    Q(s, a) = r(s, a) = s_0 a_0 - a_1^2, to within a tenth of its spread on unseen pairs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    r = lambda s, a: s[:, 0] * a[:, 0] - a[:, 1] ** 2
    s, a = torch.randn(4000, 3, generator=g), torch.rand(4000, 2, generator=g) * 2 - 1
    replay = dict(s=s, a=a, r=r(s, a), s2=torch.randn(4000, 3, generator=g), a2=torch.zeros(4000, 2), done=torch.ones(4000))
    critic = D.Critic(3, 2)
    opt = torch.optim.Adam(critic.online.parameters(), lr=D.CRITIC_LR)
    for _ in range(600):
        D.critic_update(critic, opt, replay, g)
    s, a = torch.randn(500, 3, generator=g), torch.rand(500, 2, generator=g) * 2 - 1
    with torch.no_grad():
        error = (critic(s, a).min(0).values - r(s, a)).abs().mean()
    assert error < 0.1 * r(s, a).std(), (error, r(s, a).std())
    # the targets follow the critics by Polyak averaging: moved, but not all the way
    for p, q in zip(critic.online.parameters(), critic.target.parameters()):
        assert not torch.equal(p, q)


def test_qgrpo_groups_score_actions_at_visited_states(setup, monkeypatch):
    """One QGRPO iteration: a round of Q_EPISODES episodes even from a larger env pool, G actions at
    each of N states of the played episodes, sampled under the episode's own context, scored by the
    critic (min of the twins), the ratio 1 before any update; no simulator state is saved or restored."""
    args, envs, data, model = setup
    args = dataclasses.replace(args, algo="qgrpo", traj_len=1, eval_len=0, q_steps=1, critic_ratio=0.1)
    critic, replay, rounds = D.Critic(11, 3), {}, []
    opt = torch.optim.Adam(critic.online.parameters(), lr=D.CRITIC_LR)
    play = D.play_episodes
    monkeypatch.setattr(D, "play_episodes", lambda model, envs, seeds, *a: rounds.append(len(seeds)) or play(model, envs, seeds, *a))
    pool = envs + [D.make_env("Hopper-v4") for _ in range(D.Q_EPISODES + 1 - len(envs))]  # --eval-episodes 17
    batch, stats = D.collect_scored_groups(args, model, critic, opt, replay, pool, data, 3600.0,
                                           torch.Generator().manual_seed(0), np.random.default_rng(0))
    assert rounds == [D.Q_EPISODES]
    N, G = args.reset_points, args.group_size
    assert len(replay["r"]) == stats["replay"] == stats["env_steps"]  # every step of one round of episodes
    assert batch.scores.shape == (N, G) and batch.logp_old.shape == (N * G, 1) and batch.valid.all()
    t0 = batch.t0.view(N, G)
    assert (t0 == t0[:, :1]).all()
    a = batch.ep.actions[torch.arange(N * G), batch.t0]  # (N*G, A): the candidates differ within a group
    assert not (a.view(N, G, -1) == a.view(N, G, -1)[:, :1]).all()
    with torch.no_grad():
        q = critic(batch.ep.states[torch.arange(N * G), batch.t0], a).min(0).values
        logp, _ = D.batch_log_probs(model, batch, torch.arange(N * G))
    torch.testing.assert_close(batch.scores.view(-1), q)
    within(logp - batch.logp_old, log_ratio_tolerance(model, batch, "token"), "QGRPO ratio before any update, float32")


@pytest.mark.parametrize("sign", [pytest.param(1, marks=pytest.mark.slow), -1])
def test_ladder_1_qgrpo_learns_inverted_pendulum(minari_dir, tmp_path, monkeypatch, sign):
    """Rung 1 for QGRPO: from the same random dataset, a tiny DT learns to balance InvertedPendulum-v4
    with a critic instead of resets, and unlearns with negated advantages. The run never saves or
    restores a simulator state. Unlearning shows in 6k env steps with a quarter of the critic updates
    (~13 s; with the true sign that setting rises, so the check still fails if the sign is ignored); learning
    takes the defaults and 30k (~140 s: marked slow)."""
    def no_snapshots(*_):
        raise AssertionError("QGRPO touched a simulator snapshot")

    real = D.group_advantages
    monkeypatch.setattr(D, "group_advantages", lambda scores, eps=1e-8: sign * real(scores, eps))
    monkeypatch.setattr(D, "get_snapshot", no_snapshots)
    monkeypatch.setattr(D, "set_snapshot", no_snapshots)
    # the defaults: a quarter of the critic updates ran 3x faster, but its final return (60-190 over seeds, threads
    # and kernels) straddled the bar, so the verdict hung on the CPU (docs/study.md#qgrpo-ladder-on-any-cpu)
    cheap = dict(online_steps=6_000, eval_every=3_000, critic_ratio=0.25) if sign < 0 else {}
    summary = D.run(D.Args(**{**LADDER, **cheap}, algo="qgrpo", run_dir=str(tmp_path / "run")))
    returns = [float(r["return"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["phase"] == "eval"]
    if sign > 0:
        assert np.mean(returns[1:]) > max(40.0, 3 * returns[0]), returns
    else:
        assert returns[-1] < returns[0], returns
    assert summary["algo"] == "qgrpo"


def test_qgrpo_run_interrupted_resumes_to_the_same_result(minari_dir, tmp_path, capsys):
    """Resume is bit-exact with the critic, its optimiser and the replay buffer in the checkpoint."""
    grpo_only = ("--traj-len", "--eval-len")  # GRPO's rollouts: refused with --algo qgrpo
    flags = [f for i, f in enumerate(RUN_FLAGS) if grpo_only.count(f) + grpo_only.count(RUN_FLAGS[i - 1]) == 0]
    flags += ["--algo", "qgrpo", "--online-steps", "600", "--eval-every", "300", "--q-steps", "200", "--critic-ratio", "0.2"]
    assert main(capsys, *flags, "--run-dir", tmp_path / "ref")[0] == 0
    interrupt_then_resume(tmp_path / "run", flags, 2, "qgrpo,2,", capsys)
    ref = outcome(tmp_path / "ref")
    assert outcome(tmp_path / "run") == ref and {r["phase"] for r in ref[1]} == {"pretrain", "eval", "qgrpo"}


# ---------------------------------------------------------------------------------------------
# Data: local dataset round-trip through Minari
# ---------------------------------------------------------------------------------------------
def test_local_dataset_roundtrip(minari_dir):
    D.build_random_dataset("local/roundtrip-test-v0", "Hopper-v4", 300, seed=7)
    ds = minari.load_dataset("local/roundtrip-test-v0")
    episodes = list(ds.iterate_episodes())
    assert ds.total_steps == sum(len(e.rewards) for e in episodes) >= 300
    first_obs, _ = D.make_env("Hopper-v4").reset(seed=7)
    np.testing.assert_array_equal(episodes[0].observations[0], first_obs)
    assert episodes[0].observations.shape[1:] == (11,) and episodes[0].actions.shape[1:] == (3,)
    assert all(e.terminations[-1] or e.truncations[-1] for e in episodes)
    assert ds.spec.env_spec.id == "Hopper-v4"
    minari.delete_dataset("local/roundtrip-test-v0")


# ---------------------------------------------------------------------------------------------
# The CLI: end to end, offline fallback, bad input
# ---------------------------------------------------------------------------------------------
def test_cli_end_to_end_with_offline_fallback(tmp_path, monkeypatch, capsys):
    """Empty Minari cache and no hub: the default dataset falls back, loudly, to a local random
    one; pretraining, GRPO and evaluation run; outputs are written."""
    env = {"MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    r = cli("--env", "Hopper-v4", "--online-steps", "300", "--eval-every", "100", "--run-dir",
            str(tmp_path / "run"), *TINY_FLAGS, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FALLING BACK" in r.stderr and "local/hopper-random-v0" in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env"] == "Hopper-v4" and summary["dataset"] == "local/hopper-random-v0"
    assert summary["online_env_steps"] >= 300 and math.isfinite(summary["final_score"])
    for key in ("pretrained_score", "final_score", "wall_time_s"):
        assert isinstance(summary[key], float)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    phases = {row.split(",")[0] for row in rows[1:]}
    assert phases == {"pretrain", "eval", "grpo"}
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("checkpoint.pt", "pretrained.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=True)
        assert {"model", "state_mean", "state_std", "args", "rng", "log_temp"} <= set(ckpt)

    # A second run reuses the local dataset; with no finetuning the two scores are equal.
    monkeypatch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = main(capsys, "--env", "Hopper-v4", "--online-steps", "0", "--run-dir", tmp_path / "run0", *TINY_FLAGS)
    assert code == 0, err[-3000:]
    assert "building" not in err
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert summary["final_score"] == summary["pretrained_score"] and summary["online_env_steps"] == 0


def test_help_documents_every_flag():
    """Every Args field has a docstring (tyro's help text) and appears in --help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(D.Args))).body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), node.target.id
    r = cli("--help")
    assert r.returncode == 0
    for field in dataclasses.fields(D.Args):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            flag = f"--no-{field.name.replace('_', '-')}" if field.default else flag
        assert flag in r.stdout, flag


@pytest.mark.parametrize("flags, message", [
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--env", "CartPole-v1"], "Discrete action space"),
    (["--env", "Walker2d-v4", "--dataset", "test/hopper-random-v0"], "does not fit"),
    (["--env", "Walker2d-v4", "--dataset", "local/hopper-random-v0"], "must be named local/walker2d-"),
    (["--env", "Hopper-v4", "--dataset", "local/walker2d-random-v0"], "must be named local/hopper-"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--dataset", "mujoco/hopper/nosuch-v0"], "cannot be reached"),
    (["--pretrain-steps", "-1"], "--pretrain-steps must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--context-len", "0"], "--context-len must be > 0"),
    (["--online-steps", "-5"], "--online-steps must be >= 0"),
    (["--clip-eps", "1.5"], "--clip-eps must be in (0, 1)"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval must be >= 0"),
    (["--odt-updates", "0"], "--odt-updates must be > 0"),
    (["--critic-ratio", "-1"], "--critic-ratio must be > 0"),
    (["--target-kl", "-1"], "--target-kl must be >= 0"),
    (["--algo", "qgrpo", "--traj-len", "5"], "--algo qgrpo scores single actions"),
    (["--algo", "qgrpo", "--full-episodes"], "--algo qgrpo scores single actions"),
    (["--resume", "/nonexistent/run"], "no such run directory"),
    (["--resume", "."], "holds no checkpoint.pt"),
    (["--init-checkpoint", "/nonexistent/x.pt"], "no checkpoint at"),
    (["--dataset", "local/hopper-expert-v0"], "python docs/make_dataset.py --env Hopper-v4 --level expert"),  # not invented
])
def test_bad_input_is_one_clear_line(minari_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = files(minari_dir)
    code, err = main(capsys, *flags, "--run-dir", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert files(minari_dir) == before  # refused before anything was built


def test_bad_input_through_a_new_interpreter(tmp_path):
    """The same path as a user meets it, `python dt_grpo.py`: one line on stderr, exit code 2."""
    r = cli("--group-size", "1", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith("error: --group-size must be >= 2") and len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The ablation of sub-trajectories and the ODT baseline
# ---------------------------------------------------------------------------------------------
def test_full_episode_groups(setup):
    """--full-episodes: G whole episodes from the same start state, every action sampled, scored
    by the episode return; the ratio is still 1 before any update (in float64: see above)."""
    args, envs, data, _ = setup
    args = dataclasses.replace(args, full_episodes=True)
    model = D.make_model(args, 11, 3, 1000).double().eval()
    model.load_state_dict(setup[3].state_dict())
    N, G = args.reset_points, args.group_size
    batch, stats = D.collect_groups(args, model, envs, data, 3600.0, torch.Generator().manual_seed(0),
                                    np.random.default_rng(0))
    assert (batch.t0 == 0).all() and batch.logp_old.shape == (N * G, 1000)
    s0 = batch.ep.states[:, 0].view(N, G, -1)
    assert (s0 == s0[:, :1]).all() and not (s0[:, 0] == s0[:1, 0]).all()  # same start in a group, not across
    np.testing.assert_array_equal(batch.valid.sum(1).numpy(), batch.ep.t.numpy())  # all actions sampled
    torch.testing.assert_close(batch.scores.view(-1), batch.ep.rewards.sum(1))
    assert stats["env_steps"] == int(batch.ep.t.sum())
    with torch.no_grad():
        logp, _ = D.batch_log_probs(model, batch, torch.arange(N * G))
    within(D.log_ratios(logp, batch.logp_old, batch.valid.float(), "joint"), log_ratio_tolerance(model, batch, "joint"),
           "ratio of whole episodes, float64, joint")


def test_odt_buffer_seeding_relabeling_and_fifo(setup):
    args, envs, data, model = setup
    buffer = D.best_trajectories(data, 5)
    returns = [float(tr["rtg"][0]) for tr in buffer]
    assert returns == sorted(returns, reverse=True)
    assert returns[0] == pytest.approx(data.episode_returns.max() * args.reward_scale, rel=1e-5)
    for tr in buffer:
        assert len(tr["states"]) == len(tr["actions"]) == len(tr["rtg"]) > 0
    replay = D.buffer_dataset(buffer, data)
    assert len(replay.rtg) == sum(len(tr["rtg"]) for tr in buffer)
    l0, l1 = len(buffer[0]["rtg"]), len(buffer[1]["rtg"])  # each row knows where its trajectory starts
    assert (replay.ep_start[:l0] == 0).all() and (replay.ep_start[l0:l0 + l1] == l0).all()
    assert torch.equal(replay.rtg[l0:l0 + l1], buffer[1]["rtg"])

    args = dataclasses.replace(args, odt_episodes=2, odt_buffer=6)
    stats = D.odt_explore(args, model, envs, data, buffer, 3600.0, torch.Generator().manual_seed(0),
                          np.random.default_rng(0))
    assert len(buffer) == 6  # 5 + 2 new, the oldest dropped
    assert float(buffer[0]["rtg"][0]) == pytest.approx(returns[1])
    new = buffer[-2:]
    assert sum(len(tr["rtg"]) for tr in new) == stats["env_steps"]
    # Hindsight: replaying the stored actions from the same start states in a fresh env gives the
    # rewards actually received, and the RTG tokens are their returns-to-go (not the 3600 fed).
    seeds = np.random.default_rng(0).integers(2**31, size=2)
    for tr, seed in zip(new, seeds):
        env = D.make_env("Hopper-v4")
        obs = [env.reset(seed=int(seed))[0]]
        steps = [env.unwrapped.step(a) for a in tr["actions"].numpy()]
        obs += [s[0] for s in steps[:-1]]
        torch.testing.assert_close(tr["states"], data.normalise(np.stack(obs)))
        rewards = torch.tensor([s[1] for s in steps], dtype=torch.float64)
        achieved = D.returns_to_go(rewards) * args.reward_scale
        tol = len(steps) * torch.finfo(torch.float32).eps * rewards.abs().sum() * args.reward_scale  # as for the score
        within(tr["rtg"] - achieved, tol, "relabelled returns-to-go, float32")
        assert steps[-1][2] or len(steps) == 1000  # it ended by termination or the time limit
        assert abs(float(tr["rtg"][0]) - 3.6) > 0.1


# ---------------------------------------------------------------------------------------------
# Runs that survive: reproducibility, resume after SIGINT / SIGKILL, checkpoints, guards
# ---------------------------------------------------------------------------------------------
RUN_FLAGS = [*TINY_FLAGS, "--dataset", "local/hopper-random-v0", "--pretrain-steps", "60", "--online-steps", "1500",
             "--eval-every", "500", "--checkpoint-interval", "0"]
WALL_CLOCK = ("wall_time_s", "rollout_s", "update_s")


def outcome(run_dir: Path) -> tuple[dict, list]:
    """summary.json scores and the metrics CSV without its wall-clock columns."""
    import csv

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in csv.DictReader(open(run_dir / "metrics.csv"))]
    return {k: summary[k] for k in ("pretrained_score", "final_score", "online_env_steps")}, rows


@pytest.fixture(scope="module")
def reference_run(minari_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    assert D.main([*RUN_FLAGS, "--run-dir", str(d)]) == 0
    return d


def test_same_seed_same_results_other_seed_differs(reference_run, tmp_path, capsys):
    code, err = main(capsys, *RUN_FLAGS, "--run-dir", tmp_path / "again")
    assert code == 0
    # the progress bar shows the last known score, the starting policy's before the first evaluation
    assert "score=" in err and "score=nan" not in err
    assert main(capsys, *RUN_FLAGS, "--seed", "2", "--run-dir", tmp_path / "seed2")[0] == 0
    ref = outcome(reference_run)
    assert outcome(tmp_path / "again") == ref
    other = outcome(tmp_path / "seed2")
    assert other[0] != ref[0] and other[1] != ref[1]


def interrupt_then_resume(run_dir: Path, flags: list, sig: int, after_row: str, capsys) -> None:
    """Start a run, send `sig` once its metrics CSV holds a row starting with `after_row`, resume it
    (in this process: the interrupted run needs its own, the resumed one does not)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, str(HERE / "dt_grpo.py"), *flags, "--run-dir", str(run_dir)],
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300
    while not any(line.startswith(after_row) for line in
                  ((run_dir / "metrics.csv").read_text().splitlines() if (run_dir / "metrics.csv").exists() else [])):
        assert p.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)
    p.send_signal(sig)
    err = p.communicate(timeout=300)[1]
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "checkpoint saved" in err and "Traceback" not in err, err[-2000:]
    else:
        assert p.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    code, err = main(capsys, "--resume", run_dir)
    assert code == 0 and "resuming" in err, err[-3000:]


@pytest.mark.parametrize("sig, after_row", [(2, "pretrain,51"), (9, "grpo,3,")], ids=["SIGINT-pretrain", "SIGKILL-grpo"])
def test_interrupted_run_resumes_to_the_same_result(reference_run, tmp_path, capsys, sig, after_row):
    interrupt_then_resume(tmp_path / "run", RUN_FLAGS, sig, after_row, capsys)
    assert outcome(tmp_path / "run") == outcome(reference_run)


def test_odt_run_interrupted_in_finetuning_resumes_to_the_same_result(minari_dir, tmp_path, capsys):
    flags = [*RUN_FLAGS, "--algo", "odt", "--odt-updates", "5", "--odt-buffer", "50", "--online-steps", "600",
             "--eval-every", "300"]
    assert main(capsys, *flags, "--run-dir", tmp_path / "ref")[0] == 0
    interrupt_then_resume(tmp_path / "run", flags, 2, "odt,2,", capsys)
    ref = outcome(tmp_path / "ref")
    assert outcome(tmp_path / "run") == ref and {r["phase"] for r in ref[1]} == {"pretrain", "eval", "odt"}


def test_checkpoints_load_weights_only_and_must_fit(reference_run, tmp_path, capsys):
    ckpt = torch.load(reference_run / "pretrained.pt", weights_only=True)
    assert ckpt["phase"] == "online" and ckpt["step"] == 0
    # Evaluate a checkpoint alone: the same score as when it was saved.
    code, err = main(capsys, *RUN_FLAGS, "--init-checkpoint", reference_run / "pretrained.pt", "--online-steps", "0",
                     "--run-dir", tmp_path / "eval")
    assert code == 0, err[-3000:]
    assert outcome(tmp_path / "eval")[0]["final_score"] == outcome(reference_run)[0]["pretrained_score"]
    # Another model shape, another env, a corrupt file: one clear line, exit 2.
    for flags, message in [(["--embed-dim", "64"], "--embed-dim 32 (this run: 64)"),
                           (["--env", "Hopper-v5"], "--env Hopper-v4 (this run: Hopper-v5)")]:
        code, err = main(capsys, *RUN_FLAGS, *flags, "--init-checkpoint", reference_run / "pretrained.pt",
                         "--run-dir", tmp_path / "bad")
        assert code == 2 and "Traceback" not in err and message in err, err[-2000:]
    broken = tmp_path / "broken.pt"
    broken.write_bytes((reference_run / "pretrained.pt").read_bytes()[:1000])
    code, err = main(capsys, *RUN_FLAGS, "--init-checkpoint", broken, "--run-dir", tmp_path / "bad")
    assert code == 2 and "cannot read checkpoint" in err and "Traceback" not in err
    # --resume takes the run's own args; a conflicting flag is refused.
    code, err = main(capsys, "--resume", reference_run, "--lr", "0.1")
    assert code == 2 and "differs from the run's" in err


def test_run_dir_holding_a_run_is_refused(reference_run, capsys):
    """A second run into a finished run's directory: one line naming --resume, exit 2, nothing changed."""
    before = files(reference_run)
    code, err = main(capsys, *RUN_FLAGS, "--run-dir", reference_run)
    assert code == 2 and err.strip() == (f"error: --run-dir {reference_run} holds a run, which is left as it is; "
                                         f"continue it with `--resume {reference_run}`, or give another --run-dir")
    assert files(reference_run) == before


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    """Runs started in the same second get their own directories; a directory claimed by a run that
    has not written yet is not shared either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D.time, "strftime", lambda fmt: "20261207-120000")
    args = D.Args(seed=3)
    dirs = [D.new_run_dir(args) for _ in range(3)]
    assert [d.name for d in dirs] == [f"Hopper-v4__grpo__seed3__20261207-120000{s}" for s in ("", "_2", "_3")]
    assert all(d.is_dir() for d in dirs)
    claimed = D.new_run_dir(dataclasses.replace(args, run_dir=str(tmp_path / "mine")))
    with pytest.raises(D.UserError, match="holds a run"):
        D.new_run_dir(dataclasses.replace(args, run_dir=str(claimed)))


@pytest.mark.parametrize("where", ["pretrain", "grpo"])
def test_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(minari_dir, tmp_path, monkeypatch, where):
    """Inject a NaN loss into one update: the run stops there, naming the update and the last good
    checkpoint, and the checkpoint on disk is an earlier, finite one."""
    calls = {"n": 0}
    real = D.odt_loss if where == "pretrain" else D.grpo_policy_loss

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        return (out[0] * float("nan"), *out[1:]) if calls["n"] == 30 else out

    monkeypatch.setattr(D, real.__name__, poisoned)
    args = D.Args(**{**TINY, "dataset": "local/hopper-random-v0", "pretrain_steps": 40 if where == "pretrain" else 5,
                     "batch_size": 8, "online_steps": 5000, "eval_every": 1000, "checkpoint_interval": 0.0,
                     "run_dir": str(tmp_path / "run")})
    with pytest.raises(D.NonFiniteError) as e:
        D.run(args)
    msg = str(e.value)
    assert ("pretraining update 30" if where == "pretrain" else "GRPO iteration") in msg
    assert "Last good checkpoint" in msg and str(tmp_path / "run" / "checkpoint.pt") in msg
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert f"step {ckpt['step']})" in msg  # the message names the checkpoint that is on disk

    # and a checkpoint is never written over with non-finite weights
    model = D.make_model(args, 11, 3, 1000)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    saver = D.Checkpointer(tmp_path / "run", args, "x", model, None, torch.zeros(()), None, None, None)
    with pytest.raises(D.NonFiniteError):
        saver.save("online", step=1)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def damage(root: Path, dataset_id: str, how: str) -> None:
    data = root / dataset_id / "data"
    if how == "truncated data file":
        f = data / "main_data.hdf5"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (data / "metadata.json").unlink()


def test_damaged_dataset_built_here_is_rebuilt_loudly(minari_dir, tmp_path, monkeypatch, capsys):
    """The script's own random dataset (by its metadata), cut in half: rebuilt, loudly, at this run's size."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    D.build_random_dataset("local/hopper-random-v0", "Hopper-v4", 500)
    damage(tmp_path, "local/hopper-random-v0", "truncated data file")
    data, _ = D.load_data(D.Args(dataset="local/hopper-random-v0", random_dataset_steps=700), D.make_env("Hopper-v4"))
    assert len(data.rtg) >= 700 and "REBUILDING" in capsys.readouterr().err
    assert not any(p.name.startswith(".building") for p in tmp_path.iterdir())


@pytest.mark.parametrize("dataset_id, author, how", [
    ("local/hopper-mine-v0", "someone", "truncated data file"),
    ("local/hopper-random-v0", "someone", "truncated data file"),  # a random-looking name is not ours by metadata
    ("local/hopper-random-v0", "dt-grpo", "missing metadata"),  # nothing says whose it is
])
def test_damaged_dataset_not_built_here_is_never_touched(minari_dir, tmp_path, monkeypatch, capsys, dataset_id, author, how):
    """A dataset the script did not build (or cannot tell it did) that cannot be read: one line naming the
    dataset, the file and what to do, exit 2, and every file byte-identical."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    D.build_random_dataset(dataset_id, "Hopper-v4", 150)
    meta = tmp_path / dataset_id / "data" / "metadata.json"
    meta.write_text(meta.read_text().replace('"dt-grpo"', json.dumps(author)))
    assert D.built_here(dataset_id) == (author == "dt-grpo")
    damage(tmp_path, dataset_id, how)
    before = files(tmp_path)
    code, err = main(capsys, "--dataset", dataset_id, "--run-dir", tmp_path / "run", "--random-dataset-steps", 2000)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    file = "metadata.json" if how == "missing metadata" else "main_data.hdf5"
    assert f"dataset {dataset_id!r} cannot be read: {tmp_path / dataset_id / 'data' / file}" in lines[0]
    assert "minari delete" in lines[0] and "REBUILDING" not in err
    assert files(tmp_path) == before and not (tmp_path / "run").exists()
    with pytest.raises(D.UserError, match="did not build"):  # nor can a direct call overwrite it
        D.build_random_dataset(dataset_id, "Hopper-v4", 150)
    assert files(tmp_path) == before


def test_runs_launched_together_build_one_dataset(minari_dir, tmp_path):
    """Two runs (seeds side by side) need the same missing random dataset: one builds it while the other
    waits, and both pretrain on that one copy."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", MINARI_DATASETS_PATH=str(tmp_path / "minari"))
    flags = [*TINY_FLAGS, "--dataset", "local/hopper-random-v0", "--pretrain-steps", "1", "--online-steps", "0"]
    runs = [subprocess.Popen([sys.executable, str(HERE / "dt_grpo.py"), *flags, "--seed", str(seed),
                              "--run-dir", str(tmp_path / f"run{seed}")], stderr=subprocess.PIPE, text=True, env=env)
            for seed in (1, 2)]
    errs = [p.communicate(timeout=300)[1] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], errs
    assert sum("[dt_grpo] building local/hopper-random-v0" in e for e in errs) == 1, errs
    data_lines = [next(line for line in e.splitlines() if "dataset local/hopper-random-v0:" in line) for e in errs]
    assert data_lines[0] == data_lines[1]  # the same episodes, steps and returns
    assert [p.name for p in (tmp_path / "minari" / "local").iterdir()] == ["hopper-random-v0"]


def test_metrics_a_new_key_is_a_new_column(tmp_path):
    """A diagnostic is one more key in a stats dict: it becomes a column, blank in earlier rows;
    a resumed run keeps the rows its checkpoint had seen, with the wider header."""
    import csv

    m = D.Metrics(tmp_path / "metrics.csv")
    m.write(phase="grpo", step=1, loss=0.5)
    m.write(phase="grpo", step=2, loss=0.25, my_diagnostic=7)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["loss"] for r in rows] == ["0.5", "0.25"] and [r["my_diagnostic"] for r in rows] == ["", "7"]
    D.Metrics(tmp_path / "metrics.csv", keep_rows=1).write(phase="grpo", step=2, loss=0.125)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["loss"], r["my_diagnostic"]) for r in rows] == [("1", "0.5", ""), ("2", "0.125", "")]


# ---------------------------------------------------------------------------------------------
# The walkthrough notebook
# ---------------------------------------------------------------------------------------------
def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    """walkthrough.ipynb runs top to bottom (its own fallback dataset, no network)."""
    import nbclient
    import nbformat

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(HERE / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
