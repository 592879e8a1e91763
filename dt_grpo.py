"""dt_grpo.py: online finetuning of a Decision Transformer with pure RL gradients (GRPO).

One file in the order of the algorithm: Args -> data -> model -> pretraining -> rollouts and resets
-> GRPO -> QGRPO -> ODT baseline -> evaluation -> the training loop -> plumbing (checks, datasets,
checkpoints). Sources:
  * Luo & Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients", arXiv 2601.00167
    (2026): the method. Without its code or full text, comments say [paper] for what its abstract,
    public reviews and reading notes confirm, and [ours] for this project's choices;
  * Chen et al., "Decision Transformer", arXiv 2106.01345 (2021): the model;
  * Zheng et al., "Online Decision Transformer", arXiv 2202.05607 (2022): the stochastic policy,
    the pretraining objective, and the baseline `--algo odt`;
  * Shao et al., "DeepSeekMath", arXiv 2402.03300 (2024): GRPO's group-relative advantages;
  * Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071 (2025): `--ratio mean`;
  * Fujimoto et al., "Addressing Function Approximation Error in Actor-Critic Methods" (TD3), arXiv
    1802.09477 (2018), and Yan et al., "RL Gradients as Vitamin for Online Finetuning Decision
    Transformers", arXiv 2410.24108 (2024): the critic of `--algo qgrpo`;
  * Rudin et al., "Learning to Walk in Minutes Using Massively Parallel Deep Reinforcement Learning",
    arXiv 2109.11978 (2022): the KL-adaptive learning rate of `--target-kl` (RSL-RL's PPO).

Run:
    python dt_grpo.py --env Hopper-v4                   # pretrain, finetune with GRPO, evaluate
    python dt_grpo.py --env Hopper-v4 --online-steps 0  # pretrain and evaluate only
    python dt_grpo.py --env Hopper-v4 --algo qgrpo      # no resets: the group scored by a TD3 critic
    python dt_grpo.py --resume runs/<run>               # continue an interrupted run
    python dt_grpo.py --help                            # every flag

Tensor shapes: B batch (of segments or rollouts), K context length, G group size, N reset points per
iteration, L sampled actions per rollout, T max episode steps, S/A state/action dim, D dataset steps.
"""

from __future__ import annotations

import csv, dataclasses, fcntl, hashlib, json, math, os, re, resource, shutil, signal, socket, sys, tempfile, time, warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional
from unittest import mock

import gymnasium as gym
import minari
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.checkpoint import checkpoint
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm


# =============================================================================================
# Args
# =============================================================================================
@dataclass
class Args:
    """Pretrain a stochastic Decision Transformer on a Minari dataset, then finetune it online with
    GRPO (Luo & Zhu 2026). Sized for a 2-core CPU; evidence for our defaults: docs/study.md."""
    # --- run --------------------------------------------------------------------------------
    env: str = "Hopper-v4"
    """Gymnasium MuJoCo env: Hopper, Walker2d, HalfCheetah or Ant, v4 or v5."""
    dataset: Optional[str] = None
    """Minari dataset id (default `mujoco/<env>/medium-v0`); a missing `local/<env>-random-vN` is built here."""
    random_dataset_steps: int = 100_000
    """Env steps of a locally built (uniform-random) dataset."""
    seed: int = 1
    """Seed of torch, numpy and the environments."""
    device: str = "cpu"
    """Torch device."""
    run_dir: Optional[str] = None
    """Output directory, new or empty (one that holds a run is refused: see --resume). Default:
    `runs/<env>__<algo>__seed<seed>__<time>`."""
    resume: Optional[str] = None
    """Continue the interrupted run in this directory, with that run's own args."""
    init_checkpoint: Optional[str] = None
    """Start from these weights instead of pretraining; with `--online-steps 0`, evaluate them only."""
    checkpoint_interval: float = 60.0
    """Seconds between periodic checkpoints: a kill loses at most this much work, Ctrl-C none."""
    # --- model (ODT's size: --embed-dim 512 --n-layer 4 --n-head 4 --context-len 20) -----------
    context_len: int = 10
    """K: timesteps of context [DT/ODT: 20; ours: 10, half the cost on a CPU]."""
    embed_dim: int = 128
    """Width of the transformer [ours]."""
    n_layer: int = 3
    """Transformer blocks [ours]."""
    n_head: int = 1
    """Attention heads, a divisor of --embed-dim [ours]."""
    dropout: float = 0.1
    """Dropout of supervised updates; always off in GRPO rollouts and updates [DT]."""
    # --- offline pretraining (the ODT objective) ---------------------------------------------
    pretrain_steps: int = 2000
    """Gradient updates of offline pretraining [ours; ODT: 5k-10k]."""
    batch_size: int = 64
    """Segments of K steps per supervised update, pretraining and --algo odt [ours; ODT: 256]."""
    lr: float = 3e-4
    """Pretraining learning rate, AdamW [ours; ODT: 1e-4]."""
    weight_decay: float = 5e-4
    """AdamW weight decay, pretraining and online [ODT]."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up of pretraining, in updates [ours; ODT: 10k]."""
    grad_clip: float = 0.25
    """Gradient-norm clip, pretraining and online [ODT]."""
    init_temperature: float = 0.1
    """Initial entropy temperature, learned toward entropy -|A| [ODT]."""
    reward_scale: float = 1e-3
    """Scale of the return-to-go tokens [ODT, MuJoCo]."""
    # --- GRPO --------------------------------------------------------------------------------
    algo: Literal["grpo", "qgrpo", "odt"] = "grpo"
    """`grpo`: pure RL gradients from resets [paper]; `qgrpo`: groups scored by a critic, no resets [paper; design
    ours]; `odt`: the Online Decision Transformer baseline."""
    online_steps: int = 500_000
    """Finetuning budget in env steps, all counted; the last iteration is finished [ours; Yan et al. 2024's
    comparisons: 500k]: docs/study.md#budget"""
    group_size: int = 16
    """G: rollouts per reset point, whose mean score is the baseline [paper; 16 ours]: docs/study.md#group-size"""
    reset_points: Optional[int] = None
    """N: reset points (groups) per iteration (default: the env's `grpo` in ENV_TABLE; qgrpo: 64) [ours]."""
    traj_len: Optional[int] = None
    """L: sampled actions per rollout, the ones optimised [paper] (default: the env's `grpo`) [ours]."""
    eval_len: Optional[int] = None
    """L_eval: mean-action steps after the L that score them [paper: ~400] (default: the env's `grpo`, or `keep` on
    data worth keeping: `keep_defaults`) [ours]."""
    clip_eps: float = 0.2
    """Clip range of the importance ratio [ours, PPO's value]."""
    ent_coef: float = 1e-3
    """Entropy bonus coefficient [paper: a bonus; ours: the value]."""
    epochs: int = 8
    """Passes over each iteration's rollouts [ours]: docs/study.md#epochs"""
    minibatch_size: Optional[int] = None
    """Rollouts per GRPO minibatch (default: 16; qgrpo: 256, each a single action) [ours]."""
    online_lr: float = 3e-4
    """Learning rate of online updates, GRPO or ODT, AdamW [ours; ODT: 1e-4]: docs/study.md#epochs"""
    target_kl: Optional[float] = None
    """A trust region for GRPO (and QGRPO): the online learning rate adapts to each minibatch's per-action
    KL to π_old (RSL-RL's rule, `adapt_lr`); an iteration moves about 3x this (docs/study.md#kl-overshoot);
    0: off. Default: from the data's returns (`keep_defaults`) [ours]: docs/study.md#keep-default"""
    ratio: Literal["joint", "mean", "token"] = "mean"
    """`joint`: summed log-ratios [paper]; `mean`: that / L [GSPO; ours]; `token`: per action. docs/study.md#ratio-mean"""
    reset_rule: Literal["uncertainty", "uniform"] = "uncertainty"
    """Reset points favour steps where the policy's std is high [paper: active sampling]; `uniform`: ablation."""
    reset_temperature: float = 1.0
    """Softmax temperature over the standardised uncertainty profile, lower = greedier [ours]."""
    online_target_return: Optional[float] = None
    """Return-to-go that conditions online rollouts, GRPO and ODT (default: --target-return)."""
    # --- the paper's ablations ----------------------------------------------------------------
    hindsight_relabel: bool = False
    """Train on achieved returns-to-go instead of those fed, which breaks the ratios [paper]."""
    full_episodes: bool = False
    """Groups of G whole sampled episodes from one start state instead of sub-trajectories [paper, as we read it]."""
    # --- QGRPO (--algo qgrpo) ------------------------------------------------------------------
    q_steps: int = 2000
    """Env steps per QGRPO iteration, of whole sampled episodes played 16 at a time [ours]."""
    critic_ratio: float = 1.0
    """TD3 critic updates (of 256 transitions) per new transition [TD3]: docs/study.md#qgrpo"""
    # --- ODT baseline (--algo odt) --------------------------------------------------------------
    odt_episodes: int = 8
    """Exploration episodes per ODT iteration, run together [ours; ODT: 1]."""
    odt_updates: int = 10
    """Supervised updates of --batch-size segments per ODT iteration [ours; ODT: 300 of 256]."""
    odt_buffer: int = 1000
    """Replay buffer of trajectories, first filled with the best offline ones [ODT]."""
    # --- evaluation ---------------------------------------------------------------------------
    eval_episodes: int = 10
    """Deterministic (mean-action) episodes per evaluation."""
    eval_every: int = 50_000
    """Evaluate, checkpoint and redraw curves.png every this many online env steps."""
    target_return: Optional[float] = None
    """Return-to-go that conditions evaluation (default: the env's `target` in ENV_TABLE)."""

# Per-environment constants. `dataset`: the default Minari id (recorded on the v5 envs); `target`:
# evaluation return-to-go [ours, ODT-like]; `ref_min`/`ref_max`: D4RL's random/expert returns;
# `grpo`: the sub-trajectories and minibatch [ours: docs/study.md#per-env]. Where a fall ends the episode, the score must
# look far enough ahead to see it; HalfCheetah cannot fall, and its credit assignment wants many short ones. `keep`:
# GRPO's sizes on data worth keeping (`keep_defaults`). Walker2d then looks 400 steps ahead [paper: ~400]: pushed
# faster, its gait falls 300-400 steps into an episode, past a 300-step window (docs/study.md#walker-horizon).
FALLS = dict(reset_points=4, traj_len=100, eval_len=200, minibatch_size=16)
RUNS = dict(reset_points=32, traj_len=5, eval_len=50, minibatch_size=16)
QGRPO = dict(reset_points=64, traj_len=1, eval_len=0, minibatch_size=256)  # every env: no rollouts to size [ours]
ENV_TABLE = {
    "Hopper": dict(dataset="mujoco/hopper/medium-v0", target=3600.0, ref_min=-20.272305, ref_max=3234.3, grpo=FALLS),
    "Walker2d": dict(dataset="mujoco/walker2d/medium-v0", target=5000.0, ref_min=1.629008, ref_max=4592.3, grpo=FALLS,
                     keep=dict(eval_len=400)),
    "HalfCheetah": dict(dataset="mujoco/halfcheetah/medium-v0", target=6000.0, ref_min=-280.178953, ref_max=12135.0, grpo=RUNS),
    "Ant": dict(dataset="mujoco/ant/medium-v0", target=5000.0, ref_min=-325.6, ref_max=3879.7, grpo=FALLS),
    # the learning ladder's small task (docs/study.md): [ours] random = 50 uniform-random episodes here, max = 1000
    "InvertedPendulum": dict(dataset="mujoco/invertedpendulum/medium-v0", target=1000.0, ref_min=6.8, ref_max=1000.0,
                             grpo=dict(reset_points=8, traj_len=10, eval_len=40, minibatch_size=16)),
}


def env_defaults(args: Args) -> Args:
    """`args` with the env's (or QGRPO's) N, L, L_eval and minibatch size where no flag set them."""
    table = ENV_TABLE[env_family(args.env)]["grpo"] if args.algo != "qgrpo" else QGRPO
    return dataclasses.replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})


# =============================================================================================
# Data: returns-to-go, segments of consecutive steps, the offline dataset
# =============================================================================================
def returns_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """Undiscounted R̂_t = sum_{u >= t} r_u along the last dim. (..., T) -> (..., T)"""
    return torch.flip(torch.cumsum(torch.flip(rewards, [-1]), -1), [-1])


@dataclass
class Segment:
    """B runs of n consecutive episode steps: the DT's inputs, and the actions taken (its targets).
    Steps before step 0 or past the last known one are padding (`valid` False), never attended to."""
    rtg: torch.Tensor  # (B, n) scaled return-to-go R̂_t
    states: torch.Tensor  # (B, n, S) normalised s_t
    prev_actions: torch.Tensor  # (B, n, A) a_{t-1} (zero at t = 0)
    actions: torch.Tensor  # (B, n, A) a_t
    timesteps: torch.Tensor  # (B, n) episode step t (long)
    valid: torch.Tensor  # (B, n) bool

    def __getitem__(self, rows: torch.Tensor) -> "Segment":
        return Segment(*(z[rows] for z in vars(self).values()))

    def to(self, like: torch.Tensor) -> "Segment":
        """On the device of `like`, and its float fields in its dtype (the model's weights)."""
        return Segment(*(z.to(like.device, like.dtype if z.is_floating_point() else z.dtype) for z in vars(self).values()))


def gather_segment(rtg: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, start: torch.Tensor,
                   last: torch.Tensor, first: torch.Tensor, n: int) -> Segment:
    """Segments of n steps from sequences stored flat (step t of sequence b at row start[b] + t,
    steps 0..last[b] known), from steps first[b]. It cuts both training segments from the data
    and the policy's inputs in rollouts, so the two are built alike. start, last, first (B,)."""
    t = first[:, None] + torch.arange(n)  # (B, n)
    known = t.clamp(min=0).minimum(last[:, None])  # padding points at a real step
    row, prev = start[:, None] + known, start[:, None] + (known - 1).clamp(min=0)
    return Segment(rtg[row], states[row], actions[prev] * (t > 0)[..., None], actions[row], known,
                   (t >= 0) & (t <= last[:, None]))


@dataclass
class Dataset:
    """All dataset steps flat, with each step's episode start, ready for segment sampling. It also
    owns the token conventions that online episodes must share: state normalisation, actions
    scaled from the env's bounds to the policy's [-1, 1], and the reward scale of the RTG tokens."""
    states: torch.Tensor  # (D, S) normalised
    actions: torch.Tensor  # (D, A)
    rtg: torch.Tensor  # (D,) scaled returns-to-go
    ep_start: torch.Tensor  # (D,) flat index of the first step of the step's episode
    state_mean: torch.Tensor  # (S,)
    state_std: torch.Tensor  # (S,)
    action_mid: torch.Tensor  # (A,) centre and half-width of the env's action bounds, which the
    action_half: torch.Tensor  # (A,)   policy's [-1, 1] maps to (0 and 1 for MuJoCo's locomotion envs)
    episode_returns: np.ndarray  # (episodes,)
    reward_scale: float

    @staticmethod
    def from_episodes(episodes: list, reward_scale: float, action_space: gym.spaces.Box) -> "Dataset":
        """Flatten Minari episodes: observations (T+1, S) (the last follows the last action),
        actions (T, A), rewards (T,)."""
        lengths = torch.tensor([len(ep.rewards) for ep in episodes])
        states = np.concatenate([ep.observations[:-1] for ep in episodes]).astype(np.float32)
        mean, std = states.mean(0), states.std(0) + 1e-6
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (action_space.low, action_space.high))
        mid, half = (high + low) / 2, (high - low) / 2
        actions = torch.as_tensor(np.concatenate([ep.actions for ep in episodes]), dtype=torch.float32)
        rtg = torch.cat([returns_to_go(torch.as_tensor(ep.rewards, dtype=torch.float64)) for ep in episodes])
        return Dataset(torch.as_tensor((states - mean) / std), (actions - mid) / half, (rtg * reward_scale).float(),
                       torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths), torch.as_tensor(mean),
                       torch.as_tensor(std), mid, half, np.array([ep.rewards.sum() for ep in episodes]), reward_scale)

    def normalise(self, obs: np.ndarray) -> torch.Tensor:
        """Raw observations (B, S) -> the normalised state tokens the DT was trained on."""
        return (torch.as_tensor(obs, dtype=torch.float32) - self.state_mean) / self.state_std

    def env_action(self, a: torch.Tensor) -> np.ndarray:
        """Policy actions (B, A) in [-1, 1] -> the env's units (exactly a for bounds of [-1, 1])."""
        return (self.action_mid + self.action_half * a).numpy()

    def sample(self, batch_size: int, n: int, gen: torch.Generator) -> Segment:
        """Random segments of n steps. Their last step is uniform over all steps, which weighs
        episodes by length, as ODT/CORL do; a segment reaching before its episode is padded."""
        end = torch.randint(len(self.rtg), (batch_size,), generator=gen)
        start = self.ep_start[end]
        return gather_segment(self.rtg, self.states, self.actions, start, end - start, end - start - n + 1, n)


# =============================================================================================
# Model: GPT-style Decision Transformer with a tanh-Gaussian action head
# =============================================================================================
# The DT reads an episode as one stream of three tokens per step, a_{t-1} R̂_t s_t (DT's R̂_0 s_0 a_0 R̂_1 ...
# grouped so that a step's tokens are known together). Causal attention sees a sliding window of the last
# W = 3K tokens, as in long-context language models [ours; DT and the paper cut a window of K steps for
# every action]. It is fast and keeps ratios exact:
#   * A token's hidden state never changes once computed: a rollout step runs only its three new tokens,
#     attending to a cache of the last W - 1 keys and values at every layer (`Cache`), as one pass would.
#   * Nothing before step t - n_layer * K (the receptive field, `burn_in`) reaches step t, so the cache
#     rebuilt from the `burn_in` stored steps before a reset step is the one the rollout had there: a
#     group's rollouts start from it, and GRPO's update scores a sub-trajectory in one pass behind it.
S_TOKENS = slice(2, None, 3)  # the s_t token of each step's three: the one the action head reads


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, W: int) -> torch.Tensor:
    """The real keys among the W tokens that end at each query, and the query itself (so a padding query
    gets a finite output, not NaN). Stream positions q_pos (..., Nq), k_pos (..., Nk); k_valid (B, ..., Nk)."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < W) & k_valid[..., None, :] | (d == 0)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention over the last W tokens: after a cache (a rollout step), or block by
    block (a long segment), which gives the same result as one W-band mask at a fraction of the cost."""

    def __init__(self, E: int, n_head: int, W: int, dropout: float):
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.n_head, self.W, self.dropout, self.resid_drop = n_head, W, dropout, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, past: Optional[tuple] = None,
                s_only: bool = False) -> tuple[torch.Tensor, tuple]:
        """x (B, N, E) new tokens; valid (B, C + N): which of the C cached and N new tokens are real;
        past: keys, values (B, H, C, E/H); s_only: queries at the s_t tokens only (every third), all that
        the last block is read for. Returns the output (B, N or N/3, E) and the keys and values."""
        B, N, E = x.shape
        queries = S_TOKENS if s_only else slice(None)
        q, k, v = (z.view(B, N, self.n_head, E // self.n_head).transpose(1, 2) for z in self.qkv(x).split(E, dim=2))
        W, p = self.W, self.dropout if self.training else 0.0
        if past is not None:  # the new tokens attend to the cache (C <= W - 1 tokens) and to each other
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        C = k.shape[2] - N
        if k.shape[2] <= 2 * W:  # a rollout step or a short segment: one mask over all keys
            pos = torch.arange(k.shape[2], device=x.device)
            mask = band_mask(pos[-N:][queries], pos, valid, W)
            y = F.scaled_dot_product_attention(q[:, :, queries], k, v, attn_mask=mask[:, None], dropout_p=p)
        else:  # a long segment: query block b (W tokens) attends to the keys of blocks b - 1 and b only
            pad = -N % W  # padding at the end: nothing before it looks at it; in front, W keys in all
            windows = lambda z, dim: F.pad(z, (0, 0) * (z.dim() - dim - 1) + (W - C, pad)).unfold(dim, 2 * W, W)  # views
            kb, vb = (windows(z, 2).transpose(-1, -2) for z in (k, v))  # (B, H, nb, 2W, E/H)
            mask = band_mask(torch.arange(N + pad, device=x.device).unflatten(0, (-1, W))[:, queries],  # query positions
                             torch.arange(-W, N + pad, device=x.device).unfold(0, 2 * W, W), windows(valid, 1), W)
            qb = F.pad(q, (0, 0, 0, pad)).unflatten(2, (-1, W))[:, :, :, queries]  # (B, H, nb, W or W/3, E/H)
            y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], dropout_p=p).flatten(2, 3)
            y = y[:, :, : N // 3 if s_only else N]
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, -1, E))), (k, v)


class Block(nn.Module):
    def __init__(self, E: int, n_head: int, W: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = CausalSelfAttention(E, n_head, W, dropout)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, valid: torch.Tensor, past: Optional[tuple] = None,
                s_only: bool = False) -> tuple[torch.Tensor, tuple]:
        y, kv = self.attn(self.ln1(x), valid, past, s_only)
        x = (x[:, S_TOKENS] if s_only else x) + y
        return x + self.mlp(self.ln2(x)), kv


@dataclass
class Cache:
    """The keys and values of a stream's last 3K - 1 tokens at every layer, and which of them are real
    (not padding before step 0): what a rollout keeps between steps, and what an update starts from."""
    kv: list  # per layer: keys, values (B, H, 3K-1, E/H)
    valid: torch.Tensor  # (B, 3K-1) bool

    def __getitem__(self, rows: torch.Tensor) -> "Cache":
        return Cache([(k[rows], v[rows]) for k, v in self.kv], self.valid[rows])


LONG_SEGMENT = 500  # steps; only --full-episodes' whole episodes are longer, their blocks are checkpointed [ours]
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # ODT's squashing range for the log-std
# The action bound b and u_b = atanh(b) [ours]: the float32 number nearest 0.999, so that a stored (float32) action
# compares with it exactly in every dtype; nearer ±1 a float32 keeps few digits for atanh (~4 bits at 1 - 1e-6).
ACTION_BOUND = float(np.float32(0.999))
U_BOUND = math.atanh(ACTION_BOUND)


@dataclass
class TanhNormal:
    """a = tanh(u), u ~ Normal(mean, std): the stochastic policy of ODT, censored at the bounds [ours]: every u
    beyond ±u_b gives the action ±b itself, with probability P(u >= u_b) = Φ((mean - u_b)/std) (likewise below).
    Clipped-Gaussian data (PPO's: 40-60% of its actions exactly ±1) is drawn from just such a distribution. With
    a density instead, an action at ±1 sits at atanh = ∞, a DT fits means far past it with narrow stds, and a
    small update moves its log π by tens of nats: ratios and KL explode (docs/study.md#action-bounds). Shapes (..., A)."""
    mean: torch.Tensor
    log_std: torch.Tensor

    def log_prob(self, a: torch.Tensor) -> torch.Tensor:
        """log π(a), summed over action dims: (..., A) -> (...). Inside the bounds a density, by the change of
        variables log p(a) = log N(u) - sum log(1 - tanh(u)^2), written stably as 2(log 2 - u - softplus(-2u));
        at ±b (or past it, as dataset actions at ±1) the log of the probability mass there."""
        a = a.to(self.mean.dtype)  # in the policy's dtype: stored actions are float32, and float32 atanh rounds
        # differently in a vectorised kernel than one by one
        u, std = torch.atanh(a.clamp(-ACTION_BOUND, ACTION_BOUND)), self.log_std.exp()
        log_normal = -0.5 * ((u - self.mean) / std) ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)
        log_density = log_normal - 2 * (math.log(2) - u - F.softplus(-2 * u))
        log_mass_above, log_mass_below = (torch.special.log_ndtr(z / std) for z in (self.mean - U_BOUND, -U_BOUND - self.mean))
        log_p = torch.where(a >= ACTION_BOUND, log_mass_above, torch.where(a <= -ACTION_BOUND, log_mass_below, log_density))
        return log_p.sum(-1)

    def sample(self, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        """a = tanh(mean + std * eps), censored to [-b, b]: reparameterised, differentiable in mean and std inside."""
        eps = torch.randn(self.mean.shape, generator=gen, dtype=self.mean.dtype, device=self.mean.device)
        return torch.tanh(self.mean + self.log_std.exp() * eps).clamp(-ACTION_BOUND, ACTION_BOUND)

    def entropy(self) -> torch.Tensor:
        """One-sample estimate, -log π(a) of a sampled a, as ODT (no closed form). (..., A) -> (...)"""
        return -self.log_prob(self.sample())


class DecisionTransformer(nn.Module):
    """Tokens a_{t-1}, R̂_t, s_t, each a linear embedding plus a learned embedding of its episode step
    [DT]; a causal GPT with a 3K-token sliding window (above); a_t is predicted from the s_t token's
    hidden state, so it sees R̂_≤t, s_≤t, a_<t only."""

    def __init__(self, S: int, A: int, max_ep_len: int, K: int, E: int, n_layer: int, n_head: int, dropout: float):
        super().__init__()
        self.S, self.A, self.K, self.burn_in = S, A, K, n_layer * K  # burn_in: the receptive field, in steps
        self.embed_rtg, self.embed_state, self.embed_action = nn.Linear(1, E), nn.Linear(S, E), nn.Linear(A, E)
        self.embed_t = nn.Embedding(max_ep_len, E)
        self.ln_in, self.drop = nn.LayerNorm(E), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(E, n_head, 3 * K, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(E)
        self.head = nn.Linear(E, 2 * A)  # mean and (pre-squash) log-std

    def forward(self, seg: Segment, past: Optional[Cache] = None) -> tuple[TanhNormal, Cache]:
        """The policy at every step of B segments, (B, n, A), and the cache after them. `past`:
        the cache of the stream before the segment; without it the segment starts the stream."""
        seg = seg.to(self.head.weight)  # rollout buffers live on the CPU, next to the simulator
        B, n = seg.timesteps.shape
        t_emb = self.embed_t(seg.timesteps)  # (B, n, E)
        tokens = torch.stack([self.embed_action(seg.prev_actions) + self.embed_t((seg.timesteps - 1).clamp(min=0)),
                              self.embed_rtg(seg.rtg[..., None]) + t_emb, self.embed_state(seg.states) + t_emb], 2)
        x = self.drop(self.ln_in(tokens.reshape(B, 3 * n, -1)))  # (B, 3n, E): a_{t-1} R̂_t s_t a_t R̂_{t+1} ...
        valid = torch.stack([seg.valid & (seg.timesteps > 0), seg.valid, seg.valid], 2).reshape(B, 3 * n)
        if past is not None:
            valid = torch.cat([past.valid, valid], 1)  # (B, C + 3n): the cached tokens come first
        kv = []
        for i, block in enumerate(self.blocks):  # a long segment recomputes in backward: a third of the memory
            layer = partial(checkpoint, block, use_reentrant=False) if torch.is_grad_enabled() and n > LONG_SEGMENT else block
            x, layer_kv = layer(x, valid, None if past is None else past.kv[i], i == len(self.blocks) - 1)
            kv.append(layer_kv)
        h = self.ln_f(x)  # (B, n, E): the last block computes only the s_t tokens, from which a_t is predicted
        mean, raw_log_std = self.head(h).split(self.A, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw_log_std) + 1)
        keep = 3 * self.K - 1  # the tokens a later step can see; older ones are dropped
        pad = max(0, keep - valid.shape[1])  # a stream shorter than that: padding in front
        last = lambda z: (F.pad(z, (0, 0, pad, 0)) if pad else z)[:, :, -keep:]  # (B, H, C + 3n, d) -> (B, H, keep, d)
        cache = Cache([(last(k), last(v)) for k, v in kv], F.pad(valid, (pad, 0), value=False)[:, -keep:])
        return TanhNormal(mean, log_std), cache

    def context(self, seg: Segment) -> Cache:
        """The cache after B burn-in segments (see above), each distinct one computed once: the G
        rollouts of a group share their history before the reset step [ours]. Differentiable."""
        key = torch.cat([z.flatten(1).double() for z in (seg.rtg, seg.states, seg.prev_actions, seg.timesteps, seg.valid)], 1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (B,) which distinct segment
        first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long).scatter_(0, inverse, torch.arange(len(inverse)))
        return self(seg[first])[1][inverse]


def make_model(args: Args, S: int, A: int, max_ep_len: int) -> DecisionTransformer:
    return DecisionTransformer(S, A, max_ep_len, args.context_len, args.embed_dim, args.n_layer,
                               args.n_head, args.dropout).to(args.device)


# =============================================================================================
# Pretraining: ODT objective, -log-likelihood - temperature * entropy, temperature learned toward -|A|
# =============================================================================================
def odt_loss(model: DecisionTransformer, seg: Segment, log_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (policy loss, temperature loss, entropy), averaged over the real (unpadded) steps. The
    temperature rises when the entropy is below the target -|A| and falls when above [ODT]."""
    dist, _ = model(seg)
    m = seg.valid.float().to(dist.mean.device)
    nll = -(dist.log_prob(seg.actions.to(m.device)) * m).sum() / m.sum()
    entropy = (dist.entropy() * m).sum() / m.sum()
    return nll - log_temp.exp().detach() * entropy, log_temp.exp() * (entropy - (-model.A)).detach(), entropy


def optimisers(model: DecisionTransformer, log_temp: torch.Tensor, lr: float, weight_decay: float,
               resume_from: Optional[dict] = None) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the policy; Adam for the log-temperature, with ODT's settings; restored from the
    checkpoint `resume_from` if it has them."""
    opts = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), torch.optim.Adam([log_temp], lr=1e-4)
    for opt, key in zip(opts, ("opt", "temp_opt")):
        if resume_from is not None and key in resume_from:
            opt.load_state_dict(resume_from[key])
    return opts


def odt_update(model: DecisionTransformer, opt: torch.optim.Optimizer, log_temp: torch.Tensor,
               temp_opt: torch.optim.Optimizer, seg: Segment, grad_clip: float, where: str) -> tuple[float, float]:
    """One update of the ODT objective (pretraining, and the ODT baseline's online updates):
    the policy by AdamW with gradient clipping, the log-temperature by Adam. Returns (loss, entropy)."""
    loss, temp_loss, entropy = odt_loss(model, seg, log_temp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    check_finite(where, loss=loss, gradient=grad_norm, temperature_loss=temp_loss)
    opt.step()
    temp_opt.zero_grad(set_to_none=True)
    temp_loss.backward()
    temp_opt.step()
    return loss.item(), entropy.item()


def pretrain(args: Args, model: DecisionTransformer, data: Dataset, metrics: "Metrics", gen: torch.Generator,
             log_temp: torch.Tensor, saver: Optional["Checkpointer"] = None, resume_from: Optional[dict] = None) -> None:
    """Offline pretraining as in ODT, with a linear warm-up; `log_temp` is updated in place. With
    `saver`, checkpoints as it goes; `resume_from` is a checkpoint to continue from."""
    opt, temp_opt = optimisers(model, log_temp, args.lr, args.weight_decay, resume_from)
    start = resume_from["step"] if resume_from is not None else 0
    model.train()
    bar = tqdm(range(start, args.pretrain_steps), initial=start, total=args.pretrain_steps, desc="pretrain", unit="upd")
    for step in bar:
        for group in opt.param_groups:  # linear warm-up
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        seg = data.sample(args.batch_size, model.K, gen)
        loss, entropy = odt_update(model, opt, log_temp, temp_opt, seg, args.grad_clip, f"pretraining update {step + 1}")
        if step % 50 == 0 or step == args.pretrain_steps - 1:
            bar.set_postfix(loss=f"{loss:.3f}", temp=f"{log_temp.exp().item():.3f}")
            metrics.write(phase="pretrain", step=step + 1, loss=loss, temperature=log_temp.exp().item(), entropy=entropy)
        if saver is not None:
            saver.maybe_save("pretrain", step=step + 1, opt=opt.state_dict(), temp_opt=temp_opt.state_dict())
    model.eval()


# =============================================================================================
# Rollouts and resets: B episodes advanced together, exact MuJoCo snapshots
# =============================================================================================
# GRPO starts G rollouts from the same point of a trajectory, so two things must be restored exactly: the
# simulator (snapshots) and the DT's stream (rows of `Episodes`, from which the cache is rebuilt). All
# rollouts advance in lock-step: a step of B episodes is one batched forward pass of their new tokens.
STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads: qpos, qvel, act, warm-start, time...


def get_snapshot(env: gym.Env) -> np.ndarray:
    """The full integration state of the simulator, plus the body positions [ours]. set_state(qpos,
    qvel) is not enough: it skips qacc_warmstart, whose ~1e-15 differences grow. `xpos` is not
    state, but Ant's reward reads it before stepping, as the previous mj_step left it."""
    m, d = env.unwrapped.model, env.unwrapped.data
    buf = np.empty(mujoco.mj_stateSize(m, STATE_SPEC))
    mujoco.mj_getState(m, d, buf, STATE_SPEC)
    return np.concatenate([buf, d.xpos.ravel()])


def set_snapshot(env: gym.Env, snapshot: np.ndarray) -> None:
    m, d = env.unwrapped.model, env.unwrapped.data
    n = mujoco.mj_stateSize(m, STATE_SPEC)
    mujoco.mj_setState(m, d, snapshot[:n], STATE_SPEC)
    mujoco.mj_forward(m, d)  # recompute the derived quantities the next observation reads
    d.xpos[:] = snapshot[n:].reshape(d.xpos.shape)


@dataclass
class Episodes:
    """B episodes in flight: the tokens fed to the DT and the rewards, per step. Row b holds episode b from
    step 0, so restoring "the same DT stream" at a reset is copying rows (`branch`), and its cache follows."""
    states: torch.Tensor  # (B, T+1, S) normalised observations
    actions: torch.Tensor  # (B, T+1, A) action taken at each step (row T unused)
    rewards: torch.Tensor  # (B, T+1) reward after each step (row T unused)
    rtg: torch.Tensor  # (B, T+1) scaled return-to-go token fed at each step
    t: torch.Tensor  # (B,) current episode step (long)
    done: torch.Tensor  # (B,) bool, terminated or truncated
    data: Dataset  # whose state normalisation and reward scale the tokens use

    @staticmethod
    def start(obs: np.ndarray, target_return: float, T: int, data: Dataset) -> "Episodes":
        """New episodes from reset observations obs (B, S), all conditioned on target_return."""
        B, S = obs.shape
        ep = Episodes(torch.zeros(B, T + 1, S), torch.zeros(B, T + 1, data.actions.shape[1]), torch.zeros(B, T + 1),
                      torch.zeros(B, T + 1), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool), data)
        ep.states[:, 0] = data.normalise(obs)
        ep.rtg[:, 0] = target_return * data.reward_scale
        return ep

    def record(self, rows: torch.Tensor, a: torch.Tensor, obs: np.ndarray, r: torch.Tensor, terminated: torch.Tensor) -> None:
        """One env step of episodes `rows`: action a (B', A), then reward r (B',) and observation obs (B', S).
        The next RTG token is the last minus the reward: the tokens fed are the ones GRPO trains on [paper]."""
        t = self.t[rows]
        self.actions[rows, t], self.rewards[rows, t], self.states[rows, t + 1] = a, r, self.data.normalise(obs)
        self.rtg[rows, t + 1] = self.rtg[rows, t] - r * self.data.reward_scale
        self.t[rows] = t + 1
        self.done[rows] = terminated | (t + 1 >= self.states.shape[1] - 1)  # our own time limit T

    def segment(self, rows: torch.Tensor, first: torch.Tensor, n: int) -> Segment:
        """Segments of n steps of episodes `rows` (B',) from their steps `first` (B',). The state
        after the last step T is never an input: steps from T on are padding."""
        flat = lambda z: z.reshape(-1, *z.shape[2:])  # (B, T+1, ...) -> (B(T+1), ...)
        T_plus_1 = self.states.shape[1]
        return gather_segment(flat(self.rtg), flat(self.states), flat(self.actions), rows * T_plus_1,
                              self.t[rows].clamp(max=T_plus_1 - 2), first, n)

    def branch(self, b: int, t0: torch.Tensor) -> "Episodes":
        """len(t0) copies of episode b, cut back to the reset steps t0: the state and RTG are
        known up to t0, the action and reward up to t0 - 1; everything later is zeroed."""
        steps = torch.arange(self.states.shape[1])[None, :]  # (1, T+1)
        known, taken = (steps <= t0[:, None]).float(), (steps < t0[:, None]).float()  # (B', T+1)
        return Episodes(self.states[b] * known[..., None], self.actions[b] * taken[..., None], self.rewards[b] * taken,
                        self.rtg[b] * known, t0.clone(), torch.zeros(len(t0), dtype=torch.bool), self.data)


def rollout(model: DecisionTransformer, envs: list, ep: Episodes, n_steps: int, n_sampled: int,
            gen: torch.Generator, snapshots: Optional[list] = None) -> dict:
    """Advance B episodes together (envs[b] plays episode b) for at most n_steps, one batched cached DT
    step per env step. The first n_sampled actions are sampled and their log π_old recorded, the rest are
    mean actions. Episodes end at T = max_episode_steps by our own step counter (a restore cannot rewind
    the TimeLimit wrapper's). With `snapshots` (B = 1), the simulator state before each step is kept.
    Returns logp, valid (B, n_sampled), uncertainty (B, n_steps) = mean predicted log-std, env_steps."""
    model.eval()  # dropout off: log π_old must be the exact function that is later differentiated
    B, env_steps, dtype = len(envs), 0, model.head.weight.dtype  # log π_old in the model's dtype, as log π_θ
    logp, valid = torch.zeros(B, n_sampled, dtype=dtype), torch.zeros(B, n_sampled, dtype=torch.bool)
    uncertainty = torch.full((B, n_steps), float("nan"), dtype=dtype)
    with torch.inference_mode():  # no autograd bookkeeping: faster than no_grad for these small steps
        # The cache at each episode's current step, rebuilt from its burn-in steps (exact: see the model).
        # It keeps the rows of the episodes still running, `rows`, and drops those that end.
        rows = (~ep.done).nonzero().squeeze(1)  # (B',)
        cache = model.context(ep.segment(rows, ep.t[rows] - model.burn_in, model.burn_in))
        for j in range(n_steps):
            if len(rows) == 0:
                break
            dist, cache = model(ep.segment(rows, ep.t[rows], 1), cache)  # one step: 3 new tokens
            dist = TanhNormal(dist.mean[:, 0].cpu(), dist.log_std[:, 0].cpu())  # (B', A), beside the simulator
            uncertainty[rows, j] = dist.log_std.mean(-1)
            if j < n_sampled:  # a is stored in float32, so log π_old is that of the stored a, in the model's dtype
                a = dist.sample(gen).float()
                logp[rows, j], valid[rows, j] = dist.log_prob(a), True
            else:
                a = torch.tanh(dist.mean).float()  # the mode: mean actions for evaluation and the L_eval scoring steps
            if snapshots is not None:
                snapshots.append(get_snapshot(envs[0]))
            steps = [envs[b].unwrapped.step(a_b) for b, a_b in zip(rows.tolist(), ep.data.env_action(a))]
            ep.record(rows, a, np.stack([s[0] for s in steps]), torch.tensor([s[1] for s in steps], dtype=torch.float32),
                      torch.tensor([s[2] for s in steps]))
            env_steps += len(rows)
            running = ~ep.done[rows]
            if not running.all():
                rows, cache = rows[running], cache[running]
    return dict(logp=logp, valid=valid, uncertainty=uncertainty, env_steps=env_steps)


def root_x(envs: list) -> np.ndarray:
    """x position of each env's root body (m): forward progress is its change. (B,)"""
    return np.array([env.unwrapped.data.qpos[0] for env in envs])


def play_episodes(model: DecisionTransformer, envs: list, seeds: list[int], target: float, data: Dataset,
                  gen: torch.Generator, sampled: bool = True, snapshots: Optional[list] = None) -> tuple[Episodes, dict]:
    """Reset envs[b] with seeds[b] and play whole episodes conditioned on `target`, with sampled or
    mean actions. Used by GRPO's trajectory, its full-episode ablation, ODT and evaluation."""
    envs, T = envs[: len(seeds)], envs[0].spec.max_episode_steps
    ep = Episodes.start(np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)]), target, T, data)
    played = rollout(model, envs, ep, T, T if sampled else 0, gen, snapshots)
    return ep, played


# =============================================================================================
# GRPO: reset points, groups, advantages, sequence-level ratios, clipped surrogate
# =============================================================================================
# One iteration [paper], letters as in the functions below:
#   (a) roll out the current policy from env.reset, conditioned on the online target return,
#       keeping a simulator snapshot and the policy's uncertainty at every step;
#   (b) choose N reset points along it, favouring uncertain steps (active sampling);
#   (c) from each, G rollouts from the same snapshot and DT context: L sampled actions, then
#       L_eval mean actions that score them; R_i = the rewards summed (no critic, no discount);
#   (d) Â_i = (R_i - group mean) / group std;
#   (e) clipped surrogate with one importance ratio per sub-trajectory, plus an entropy bonus;
#   (f) train on the RTG tokens that were fed during the rollout: with hindsight relabeling the
#       ratio's denominator would not be the distribution that sampled the action.
def choose_reset_points(uncertainty: torch.Tensor, n: int, rule: str, temperature: float,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(b) Draw n reset steps (n,) along a trajectory from its uncertainty profile (T,), and return them with
    each step's probability (T,). Active sampling favours uncertain states; the rule is not published
    [paper]. Ours: a softmax of the standardised uncertainty / temperature (the same on every env), or
    `uniform`; with replacement only when the trajectory has fewer than n steps."""
    if rule == "uniform" or len(uncertainty) < 2:
        probs = torch.full_like(uncertainty, 1 / len(uncertainty))
    else:
        z = (uncertainty - uncertainty.mean()) / (uncertainty.std() + 1e-8)
        probs = torch.softmax(z / temperature, dim=0)
    return torch.multinomial(probs, n, replacement=len(probs) < n, generator=gen), probs


def score_rollouts(ep: Episodes, t0: torch.Tensor) -> torch.Tensor:
    """(c) R_i: the rewards of the steps rollout i took after its reset step t0, up to its end
    (L + L_eval steps, termination or the time limit). (B,) [paper]"""
    steps = torch.arange(ep.rewards.shape[1])[None, :]  # (1, T+1)
    taken = (steps >= t0[:, None]) & (steps < ep.t[:, None])  # (B, T+1)
    return (ep.rewards * taken).sum(1)


def group_advantages(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(d) GRPO advantages: Â_i = (R_i - mean_group R) / (std_group R + eps). (N, G) -> (N, G). The group
    mean is the baseline, no critic [paper]; a group of equal scores, which says nothing about which
    actions were better, gives exactly zero."""
    centred = scores - scores.mean(1, keepdim=True)
    return centred / (scores.std(1, unbiased=False, keepdim=True) + eps)


@dataclass
class GroupBatch:
    """What one GRPO iteration collected: N*G rollouts of L sampled actions each."""
    ep: Episodes  # (B = N*G) rollout histories (whose rows the update's segments are cut from)
    t0: torch.Tensor  # (B,) reset step of each rollout
    logp_old: torch.Tensor  # (B, L) log π_old of the sampled actions, recorded while acting (L = T with --full-episodes)
    valid: torch.Tensor  # (B, L) bool, False after the episode ended
    scores: torch.Tensor  # (N, G) R_i
    adv: torch.Tensor  # (B,) group advantages


def collect_groups(args: Args, model: DecisionTransformer, envs: list, data: Dataset, target: float,
                   gen: torch.Generator, rng: np.random.Generator) -> tuple[GroupBatch, dict]:
    """Steps (a)-(d) of one GRPO iteration; returns the batch and rollout statistics."""
    if args.full_episodes:
        return collect_full_episodes(args, model, envs, data, target, gen, rng)
    N, G, L, eval_len = args.reset_points, args.group_size, args.traj_len, args.eval_len
    # (a) one trajectory of the current policy, with a snapshot at every step. Mean actions [ours]: a
    # sampled trajectory falls early, and its reset points never reach the states a standing
    # policy visits (docs/study.md#traj-std-scale).
    snapshots: list = []
    traj, traj_out = play_episodes(model, envs, [int(rng.integers(2**31))], target, data, gen, False, snapshots)
    n = int(traj.t[0])
    # (b) reset points: active sampling by the policy's uncertainty along the trajectory.
    t0, _ = choose_reset_points(traj_out["uncertainty"][0, :n], N, args.reset_rule, args.reset_temperature, gen)
    # (c) G rollouts from each reset point: same simulator state, same DT context.
    t0 = t0.repeat_interleave(G)  # (N*G,)
    ep = traj.branch(0, t0)
    for env, t in zip(envs[: N * G], t0.tolist()):
        set_snapshot(env, snapshots[t])
    x_start = root_x(envs[: N * G])
    group_out = rollout(model, envs[: N * G], ep, L + eval_len, L, gen)
    scores = score_rollouts(ep, t0).view(N, G)
    # Diagnostics (each key is a metrics.csv column): where the reset points fall along the
    # trajectory, and what the scores are made of: falls, and forward progress in metres.
    full = torch.clamp(envs[0].spec.max_episode_steps - t0, max=L + eval_len)  # (N*G,) steps if it stays up
    stats = dict(traj_return=traj.rewards[0].sum().item(), traj_len=n,
                 traj_log_std=traj_out["uncertainty"][0, :n].mean().item(),
                 t0_mean=t0.float().mean().item(), t0_max=int(t0.max()),
                 fell=(ep.t - t0 < full).float().mean().item(), forward=float(np.mean(root_x(envs[: N * G]) - x_start)))
    return finish_groups(args, ep, t0, group_out, scores, traj_out["env_steps"] + group_out["env_steps"], stats)


def collect_full_episodes(args: Args, model: DecisionTransformer, envs: list, data: Dataset, target: float,
                          gen: torch.Generator, rng: np.random.Generator) -> tuple[GroupBatch, dict]:
    """Ablation --full-episodes: G whole episodes from each of N start states (the same seed gives
    the same start state), every action sampled, each scored by its episode return."""
    N, G = args.reset_points, args.group_size
    seeds = [int(s) for s in rng.integers(2**31, size=N) for _ in range(G)]
    ep, played = play_episodes(model, envs, seeds, target, data, gen)
    t0 = torch.zeros(N * G, dtype=torch.long)
    scores = score_rollouts(ep, t0).view(N, G)
    return finish_groups(args, ep, t0, played, scores, played["env_steps"], dict(traj_return=scores.mean().item()))


def finish_groups(args: Args, ep: Episodes, t0: torch.Tensor, played: dict, scores: torch.Tensor, env_steps: int,
                  stats: dict) -> tuple[GroupBatch, dict]:
    """(d) group-relative advantages, and (f) the RTG tokens to train on: those fed, unless the
    --hindsight-relabel ablation rewrites them."""
    adv = group_advantages(scores).view(-1)
    if args.hindsight_relabel:
        ep = hindsight_relabel(ep)
    spread = scores.std(1, unbiased=False)  # (N,) within-group score std
    stats.update(env_steps=env_steps, group_score=scores.mean().item(), score_std=spread.mean().item(),
                 zero_spread=(spread == 0).float().mean().item())
    return GroupBatch(ep, t0, played["logp"], played["valid"], scores, adv), stats


def hindsight_relabel(ep: Episodes) -> Episodes:
    """ODT's hindsight return relabeling, the paper's negative ablation: RTG tokens become the (scaled)
    return each rollout achieved from that step on. The actions were sampled under the *original* tokens,
    so π_old(a | relabelled context) is not the distribution a came from: the ratios are wrong [paper]."""
    return dataclasses.replace(ep, rtg=returns_to_go(ep.rewards) * ep.data.reward_scale)


def log_ratios(logp_new: torch.Tensor, logp_old: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """(e) Log importance ratios. (B, L) -> (B,) for 'joint'/'mean', (B, L) for 'token'.
    joint [paper]: log ρ_i = Σ_t log π_θ(a_t|c_t) - log π_old(a_t|c_t) over the sampled actions.
    mean (GSPO): that sum divided by the number of sampled actions.
    token (PPO/GRPO ablation): one ratio per action."""
    diff = (logp_new - logp_old) * valid
    if mode == "token":
        return diff
    total = diff.sum(1)
    return total if mode == "joint" else total / valid.sum(1).clamp(min=1)


def clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's pessimistic objective, elementwise: -min(ρ Â, clip(ρ, 1-ε, 1+ε) Â). Broadcasts."""
    ratio = log_ratio.exp()
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def grpo_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, valid: torch.Tensor, adv: torch.Tensor,
                     mode: str, clip_eps: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate of one minibatch, and its diagnostics.
    logp_new, logp_old, valid: (B, L); adv: (B,). Averaged over rollouts for the sequence
    ratios, over valid actions for the token ratio (each action weighs once)."""
    log_rho = log_ratios(logp_new, logp_old, valid, mode)  # (B,) or (B, L)
    if mode == "token":
        adv, weight = adv[:, None], valid
    else:
        weight = torch.ones_like(log_rho)
    loss = (clipped_surrogate(log_rho, adv, clip_eps) * weight).sum() / weight.sum()
    with torch.no_grad():
        token_log_rho = (logp_new - logp_old) * valid
        stat = dict(abs_log_ratio=((log_rho.abs() * weight).sum() / weight.sum()).item(),
                    clip_frac=((((log_rho.exp() - 1).abs() > clip_eps) * weight).sum() / weight.sum()).item(),
                    # k3 estimator of KL(π_old || π_θ) per action (Schulman 2020)
                    approx_kl=((token_log_rho.exp() - 1 - token_log_rho) * valid).sum().item() / valid.sum().item())
    return loss, stat


def adapt_lr(lr: float, kl: float, target: float) -> float:
    """The KL-adaptive learning rate of RSL-RL's PPO (Rudin et al. 2022): divided by 1.5 when a minibatch's
    per-action KL to π_old is above twice the target, multiplied by 1.5 when below half of it, kept in
    [1e-6, 1e-2]. A trust region where early stopping is none: one Adam step at 3e-4 already moves a
    DT by more than 0.05 nats per action (docs/study.md#trust-region). The KL to π_old adds up over an
    iteration's minibatches, and Adam's momentum outlasts a cut of the rate: an iteration moves about 3x
    the target (docs/study.md#kl-overshoot)."""
    lr = lr / 1.5 if kl > 2 * target else lr * 1.5 if kl < target / 2 else lr
    return min(max(lr, 1e-6), 1e-2)


KEEP_LEVEL, KEEP_KL = 20.0, 0.01  # normalised return of data worth keeping; the per-action KL that keeps it [ours]


def keep_defaults(args: Args, data_score: float) -> Args:
    """`args` with what keeps a competent DT where no flag set it, from the dataset's mean normalised return [ours].
    Data of a policy that stands (>= 20; D4RL's medium is 40-60) gives the DT a gait to keep, which unconstrained
    steps lose: a trust region of 0.01 (docs/study.md#keep-default), and the env's `keep` sizes for GRPO (ENV_TABLE).
    Random data (0-5) gives a DT with no gait, which falls within 200 steps: neither, the env's `grpo` sizes."""
    keep = dict(target_kl=0.0)
    if data_score >= KEEP_LEVEL:
        keep = dict(target_kl=KEEP_KL) | (ENV_TABLE[env_family(args.env)].get("keep", {}) if args.algo == "grpo" else {})
    return dataclasses.replace(args, **{k: v for k, v in keep.items() if getattr(args, k) is None})


def batch_log_probs(model: DecisionTransformer, batch: GroupBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ of the sampled actions of rollouts `rows`, (len(rows), L) with zeros at invalid
    steps, and the mean entropy estimate over the valid ones. As in the rollout: the cache at the
    reset step t0 from the burn-in steps before it, then one pass over the sampled steps (to the last
    one of any rollout in `rows`), each scored under exactly the inputs it was sampled with (see the model)."""
    t0, valid = batch.t0[rows], batch.valid[rows]
    n = int(valid.sum(1).max())  # the steps after the last sampled one of every rollout cannot change these (causal)
    seg = batch.ep.segment(rows, t0, n)
    dist, _ = model(seg, model.context(batch.ep.segment(rows, t0 - model.burn_in, model.burn_in)))  # (B', n, A)
    logp = F.pad(dist.log_prob(seg.actions.to(dist.mean.device)).cpu(), (0, valid.shape[1] - n))  # (B', L)
    return logp * valid, dist.entropy().cpu()[valid[:, :n]].mean()


def grpo_update(args: Args, model: DecisionTransformer, opt: torch.optim.Optimizer, batch: GroupBatch,
                gen: torch.Generator, where: str = "GRPO update") -> dict:
    """(e) Several epochs of minibatch updates of the clipped surrogate with the chosen ratio,
    plus an entropy bonus [paper]. Dropout is off: π_θ must be the same function that acted.
    Rollouts of zero-spread groups have Â = 0 and are skipped (they add no gradient)."""
    model.eval()
    rows_all = (batch.adv != 0).nonzero().squeeze(1)
    stats: dict[str, list] = dict(abs_log_ratio=[], clip_frac=[], approx_kl=[], entropy=[])
    for _ in range(args.epochs if len(rows_all) else 0):  # no update at all if every group has zero spread
        for rows in rows_all[torch.randperm(len(rows_all), generator=gen)].split(args.minibatch_size):
            logp_new, entropy = batch_log_probs(model, batch, rows)
            valid = batch.valid[rows].float()
            policy_loss, stat = grpo_policy_loss(logp_new, batch.logp_old[rows], valid, batch.adv[rows],
                                                 args.ratio, args.clip_eps)
            if args.target_kl:  # the step below is taken at the adapted rate
                for group in opt.param_groups:
                    group["lr"] = adapt_lr(group["lr"], stat["approx_kl"], args.target_kl)
            loss = policy_loss - args.ent_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            check_finite(where, importance_ratio=logp_new - batch.logp_old[rows], loss=loss, gradient=grad_norm)
            opt.step()
            for k, v in dict(stat, entropy=entropy.item()).items():
                stats[k].append(v)
    return {k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()} | dict(lr=opt.param_groups[0]["lr"])


# =============================================================================================
# QGRPO (--algo qgrpo): GRPO without resets, the group scored by a TD3 critic
# =============================================================================================
# Where the simulator cannot be restored, the paper scores a group with a TD3-style critic instead of
# rollouts [paper]. Its formulation is not public: this one is ours. It comes after GRPO because it
# changes one step of it, (c); letters as there:
#   (a) play sampled episodes from env.reset (no snapshot anywhere); their transitions fill a
#       replay buffer, each with the DT's mean action at s' under the context it had;
#   (b) train twin Q critics on the buffer: clipped double Q, Polyak targets, target-policy smoothing
#       [TD3; sizes as Vitamin's critic for ODT, Yan et al. 2024];
#   (c) choose N of those episodes' states by the policy's uncertainty (active sampling); at each, G
#       actions from π_old under the same context, each scored by min(Q1, Q2)(s, a), with no env step;
#   (d)-(f) unchanged: group advantages, the clipped surrogate (L = 1: every ratio is per action), no relabeling.
GAMMA, TAU, POLICY_NOISE, NOISE_CLIP, CRITIC_LR, CRITIC_BATCH = 0.99, 0.005, 0.2, 0.5, 1e-3, 256  # [TD3; Vitamin]
REPLAY, Q_EPISODES = 200_000, 16  # transitions kept, oldest dropped first; episodes played together [ours]


class Critic(nn.Module):
    """TD3's twin Q(s, a), 2 x 256 ReLU MLPs on normalised states and policy actions in [-1, 1], and their
    Polyak-averaged targets."""

    def __init__(self, S: int, A: int):
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Linear(S + A, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        self.online, self.target = nn.ModuleList([mlp(), mlp()]), nn.ModuleList([mlp(), mlp()])
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)

    def forward(self, s: torch.Tensor, a: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Both Q estimates: (B, S), (B, A) -> (2, B)."""
        sa = torch.cat([s, a], -1)
        return torch.stack([q(sa)[:, 0] for q in (self.target if target else self.online)])


def transitions(model: DecisionTransformer, ep: Episodes) -> dict:
    """(a) The transitions of finished episodes, flat: s, a, r, s', done (terminated, not truncated) and a',
    the DT's mean action at s', from one pass over each episode. The step before the time limit T is
    left out: its s' is at step T, which the DT has no timestep embedding for."""
    B, T = ep.t.shape[0], ep.states.shape[1] - 1
    rows, n = torch.arange(B), min(int(ep.t.max()) + 1, T)  # the steps played, and the state after the last
    with torch.no_grad():
        next_action = torch.tanh(model(ep.segment(rows, torch.zeros_like(rows), n))[0].mean).float().cpu()  # (B, n, A)
    next_action = F.pad(next_action, (0, 0, 0, T - n))  # (B, T, A), zeros after the last step
    steps = torch.arange(T - 1)[None, :]  # (1, T-1)
    keep = steps < ep.t[:, None]  # (B, T-1)
    terminated = (steps == ep.t[:, None] - 1) & (ep.t[:, None] < T)
    return dict(s=ep.states[:, :-2][keep], a=ep.actions[:, :-2][keep], r=ep.rewards[:, :-2][keep],
                s2=ep.states[:, 1:-1][keep], a2=next_action[:, 1:][keep], done=terminated[keep].float())


def critic_update(critic: Critic, opt: torch.optim.Optimizer, replay: dict, gen: torch.Generator) -> float:
    """(b) One TD3 critic step on CRITIC_BATCH transitions: y = r + γ (1 - done) min Q_target(s', a' + clipped
    noise), both critics regressed on y, then the targets moved by TAU. Returns the loss."""
    i = torch.randint(len(replay["r"]), (CRITIC_BATCH,), generator=gen)
    s, a, r, s2, a2, done = (replay[k][i] for k in ("s", "a", "r", "s2", "a2", "done"))
    with torch.no_grad():
        noise = (torch.randn(a2.shape, generator=gen) * POLICY_NOISE).clamp(-NOISE_CLIP, NOISE_CLIP)
        y = r + GAMMA * (1 - done) * critic(s2, (a2 + noise).clamp(-1, 1), target=True).min(0).values
    loss = ((critic(s, a) - y) ** 2).sum(0).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p, p_target in zip(critic.online.parameters(), critic.target.parameters()):
            p_target.lerp_(p, TAU)
    return loss.item()


def collect_scored_groups(args: Args, model: DecisionTransformer, critic: Critic, critic_opt: torch.optim.Optimizer,
                          replay: dict, envs: list, data: Dataset, target: float, gen: torch.Generator,
                          rng: np.random.Generator) -> tuple[GroupBatch, dict]:
    """Steps (a)-(d) of one QGRPO iteration; `replay` grows in place. Returns the batch and statistics."""
    N, G, env_steps, players = args.reset_points, args.group_size, 0, envs[:Q_EPISODES]  # the pool may hold more
    while env_steps < args.q_steps:  # (a) rounds of one episode per player
        ep, played = play_episodes(model, players, [int(s) for s in rng.integers(2**31, size=len(players))], target, data, gen)
        env_steps += played["env_steps"]
        for k, v in transitions(model, ep).items():
            replay[k] = torch.cat([replay.get(k, v[:0]), v])[-REPLAY:]
    losses = [critic_update(critic, critic_opt, replay, gen) for _ in range(math.ceil(args.critic_ratio * env_steps))]  # (b)
    # (c) N states of the last round's episodes (their steps laid end to end), G copies of each with its DT stream
    b, t = (~torch.isnan(played["uncertainty"])).nonzero().unbind(1)  # every step played, episode by episode
    pick, _ = choose_reset_points(played["uncertainty"][b, t], N, args.reset_rule, args.reset_temperature, gen)
    b, t0 = b[pick].repeat_interleave(G), t[pick].repeat_interleave(G)  # (N*G,)
    groups, rows = ep.branch(b, t0), torch.arange(N * G)
    with torch.no_grad():  # π_old at t0, exactly as the update will compute it (see the model)
        dist, _ = model(groups.segment(rows, t0, 1), model.context(groups.segment(rows, t0 - model.burn_in, model.burn_in)))
        a = dist.sample(gen).float()  # (N*G, 1, A)
        groups.actions[rows, t0] = a[:, 0]
        scores = critic(groups.states[rows, t0], a[:, 0]).min(0).values.view(N, G)
    stats = dict(traj_return=ep.rewards.sum(1).mean().item(), critic_loss=float(np.mean(losses)),
                 q_mean=scores.mean().item(), replay=len(replay["r"]))
    return finish_groups(args, groups, t0, dict(logp=dist.log_prob(a).cpu(), valid=torch.ones(N * G, 1, dtype=torch.bool)),
                         scores, env_steps, stats)


# =============================================================================================
# ODT baseline (--algo odt): hindsight relabeling and supervised updates, for comparison
# =============================================================================================
# Online Decision Transformer (Zheng et al. 2022), as the paper's main baseline. A replay buffer
# of trajectories starts with the best offline ones; each iteration plays exploration episodes
# conditioned on the online target return, relabels their RTG tokens with the returns actually
# achieved (hindsight), replaces the oldest trajectories with them, and takes supervised steps of
# the pretraining objective on windows from the buffer. No ratios, no advantages.
def best_trajectories(data: Dataset, n: int) -> list[dict]:
    """The n offline trajectories of highest return, as buffer entries: states (T, S),
    actions (T, A), rtg (T,) scaled."""
    starts = torch.unique_consecutive(data.ep_start)
    ends = torch.cat([starts[1:], torch.tensor([len(data.rtg)])])
    best = np.argsort(-data.episode_returns, kind="stable")[:n]
    return [dict(states=data.states[starts[i]:ends[i]], actions=data.actions[starts[i]:ends[i]],
                 rtg=data.rtg[starts[i]:ends[i]]) for i in best.tolist()]


def buffer_dataset(buffer: list[dict], data: Dataset) -> Dataset:
    """The buffer's trajectories as a flat Dataset, so that ODT samples windows exactly as
    pretraining does (window ends uniform over steps: trajectories weighted by length, as in ODT)."""
    lengths = torch.tensor([len(tr["rtg"]) for tr in buffer])
    starts = torch.cumsum(lengths, 0) - lengths
    return dataclasses.replace(
        data, states=torch.cat([tr["states"] for tr in buffer]), actions=torch.cat([tr["actions"] for tr in buffer]),
        rtg=torch.cat([tr["rtg"] for tr in buffer]), ep_start=torch.repeat_interleave(starts, lengths),
        episode_returns=np.array([float(tr["rtg"][0]) for tr in buffer]))


def odt_explore(args: Args, model: DecisionTransformer, envs: list, data: Dataset, buffer: list[dict], target: float,
                gen: torch.Generator, rng: np.random.Generator) -> dict:
    """args.odt_episodes stochastic episodes conditioned on `target`, relabelled in hindsight and
    added to the buffer, whose oldest trajectories make room (FIFO, as ODT)."""
    seeds = [int(s) for s in rng.integers(2**31, size=args.odt_episodes)]
    ep, played = play_episodes(model, envs, seeds, target, data, gen)
    relabelled = hindsight_relabel(ep)
    for b, n in enumerate(ep.t.tolist()):
        buffer.append(dict(states=ep.states[b, :n], actions=ep.actions[b, :n], rtg=relabelled.rtg[b, :n]))
    del buffer[: max(0, len(buffer) - args.odt_buffer)]
    return dict(env_steps=played["env_steps"], traj_return=ep.rewards.sum(1).mean().item())


def odt_train(args: Args, model: DecisionTransformer, opt: torch.optim.Optimizer, log_temp: torch.Tensor,
              temp_opt: torch.optim.Optimizer, buffer: list[dict], data: Dataset, gen: torch.Generator,
              where: str = "ODT update") -> dict:
    """args.odt_updates supervised updates on windows of the buffer (dropout on, as in pretraining)."""
    replay = buffer_dataset(buffer, data)
    model.train()
    losses = [odt_update(model, opt, log_temp, temp_opt, replay.sample(args.batch_size, model.K, gen), args.grad_clip,
                         where) for _ in range(args.odt_updates)]  # (loss, entropy) per update
    model.eval()
    loss, entropy = map(np.mean, zip(*losses))
    return dict(loss=float(loss), entropy=float(entropy), temperature=log_temp.exp().item())


# =============================================================================================
# Evaluation: deterministic rollouts, D4RL-normalised score
# =============================================================================================
def normalised_score(env_id: str, returns: np.ndarray) -> np.ndarray:
    """D4RL normalised score: 100 (R - random) / (expert - random)."""
    c = ENV_TABLE[env_family(env_id)]
    return 100 * (returns - c["ref_min"]) / (c["ref_max"] - c["ref_min"])


def evaluate(args: Args, model: DecisionTransformer, envs: list, data: Dataset,
             target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns of args.eval_episodes mean-action episodes, run together, how far each moved forward
    (x of the root body, m: a hopper that stands earns ~1000 and moves ~0), and whether it fell (ended
    before the time limit: a fast gait that falls now and then, docs/study.md#walker-last-points). Seeds are
    fixed so that every evaluation of a run sees the same start states. (E,), (E,), (E,) bool"""
    seeds = [10_000 + args.seed * 1000 + i for i in range(args.eval_episodes)]
    envs = envs[: len(seeds)]
    ep, _ = play_episodes(model, envs, seeds, target, data, torch.Generator(), sampled=False)
    forward = root_x(envs) - np.array([env.unwrapped.init_qpos[0] for env in envs])
    return ep.rewards.sum(1).numpy(), forward, ep.t.numpy() < envs[0].spec.max_episode_steps


# =============================================================================================
# The training loop: GRPO (or ODT) iterations, evaluation, checkpoints
# =============================================================================================
def finetune(args: Args, model: DecisionTransformer, log_temp: torch.Tensor, envs: list, data: Dataset,
             metrics: "Metrics", saver: "Checkpointer", target: float, gen: torch.Generator, rng: np.random.Generator,
             resume_from: Optional[dict] = None) -> tuple[float, int]:
    """GRPO (QGRPO, ODT) iterations until the env-step budget is spent; evaluates every args.eval_every
    env steps. `resume_from`: a checkpoint to continue from. Returns the last normalised score
    and the env steps used. All algorithms count every env.step, so they compare at equal env steps."""
    online_target = args.online_target_return if args.online_target_return is not None else target
    opt, temp_opt = optimisers(model, log_temp, args.online_lr, args.weight_decay, resume_from)  # ODT's temperature learns on
    buffer = best_trajectories(data, args.odt_buffer) if args.algo == "odt" else []
    critic = Critic(data.states.shape[1], data.actions.shape[1]) if args.algo == "qgrpo" else None  # on the CPU
    critic_opt, replay = torch.optim.Adam(critic.online.parameters(), lr=CRITIC_LR) if critic else None, {}
    # the progress bar shows the last known score: the starting policy's until the first evaluation
    env_steps, it, next_eval, score = 0, 0, args.eval_every, saver.info.get("pretrained_score", float("nan"))
    if resume_from is not None and "opt" in resume_from:
        buffer, env_steps, it = resume_from["buffer"], resume_from["env_steps"], resume_from["step"]
        next_eval, score = resume_from["next_eval"], resume_from["score"]
        if critic is not None:
            critic.load_state_dict(resume_from["critic"])
            critic_opt.load_state_dict(resume_from["critic_opt"])
            replay = resume_from["replay"]
    bar = tqdm(total=args.online_steps, initial=min(env_steps, args.online_steps), desc=args.algo.upper(), unit="step")
    while env_steps < args.online_steps:
        tic, where = time.time(), f"{args.algo.upper()} iteration {it + 1}"
        if args.algo == "odt":
            stats = odt_explore(args, model, envs, data, buffer, online_target, gen, rng)
            collected = time.time()
            stats.update(odt_train(args, model, opt, log_temp, temp_opt, buffer, data, gen, where))
        else:
            batch, stats = (collect_groups(args, model, envs, data, online_target, gen, rng) if critic is None else
                            collect_scored_groups(args, model, critic, critic_opt, replay, envs, data, online_target, gen, rng))
            collected = time.time()
            stats.update(grpo_update(args, model, opt, batch, gen, where))
        stats.update(rollout_s=collected - tic, update_s=time.time() - collected)
        env_steps, it = env_steps + stats.pop("env_steps"), it + 1
        metrics.write(phase=args.algo, step=it, env_steps=env_steps, **stats)
        evaluated = env_steps >= next_eval or env_steps >= args.online_steps
        if evaluated:
            returns, forward, fell = evaluate(args, model, envs, data, target)
            score = float(normalised_score(args.env, returns).mean())
            metrics.write(phase="eval", step=it, env_steps=env_steps, norm_score=score, eval_forward=forward.mean(),
                          eval_fell=fell.mean(), **{"return": returns.mean()})
            plot_curves(metrics, args.env)
            next_eval = (env_steps // args.eval_every + 1) * args.eval_every
        bar.update(min(env_steps, args.online_steps) - bar.n)
        bar.set_postfix(score=f"{score:.1f}", ret=f"{stats['traj_return']:.0f}")
        saver.maybe_save("online", force=evaluated, step=it, env_steps=env_steps, next_eval=next_eval, score=score,
                         opt=opt.state_dict(), temp_opt=temp_opt.state_dict(), buffer=buffer,
                         **(dict(critic=critic.state_dict(), critic_opt=critic_opt.state_dict(), replay=replay) if critic else {}))
    bar.close()
    return score, env_steps


# =============================================================================================
# Plumbing: argument checks, datasets (download, offline fallback, rebuild), metrics and curves,
# checkpoints and resume, the pipeline, main
# =============================================================================================
class UserError(Exception):
    """Bad input: one line on stderr, exit code 2, no traceback."""


class NonFiniteError(Exception):
    """A non-finite loss, gradient or ratio: the update is not applied and the run stops."""


def check_finite(where: str, **values: torch.Tensor) -> None:
    for name, v in values.items():
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"non-finite {name} at {where}; the update was not applied")


def log(msg: str, loud: bool = False) -> None:
    """A line on stderr that keeps the progress bars intact; `loud` frames a warning."""
    tqdm.write(f"{'!' * 88}\n[dt_grpo] WARNING: {msg}\n{'!' * 88}" if loud else f"[dt_grpo] {msg}", file=sys.stderr)


def env_family(env_id: str) -> str:
    return env_id.split("-v")[0]


def check_args(args: Args) -> None:
    """Reject nonsense before any work is done. None (an unset optional flag) passes."""
    rules = [  # (fields, test, what the value must be)
        (("pretrain_steps", "online_steps", "warmup_steps", "checkpoint_interval", "eval_len", "target_kl"),
         lambda v: v >= 0, ">= 0"),
        (("random_dataset_steps", "batch_size", "context_len", "embed_dim", "n_layer", "n_head", "epochs", "minibatch_size",
          "eval_episodes", "eval_every", "odt_episodes", "odt_updates", "odt_buffer", "lr", "online_lr", "reward_scale",
          "init_temperature", "reset_temperature", "grad_clip", "reset_points", "traj_len", "q_steps", "critic_ratio"),
         lambda v: v > 0, "> 0"),
        (("group_size",), lambda v: v >= 2, ">= 2 (a group of one is its own baseline: every advantage would be 0)"),
        (("dropout",), lambda v: 0 <= v < 1, "in [0, 1)"),
        (("clip_eps",), lambda v: 0 < v < 1, "in (0, 1)"),
        (("target_return", "online_target_return"), math.isfinite, "a finite number"),
    ]
    for names, ok, what in rules:
        for name in names:
            v = getattr(args, name)
            if v is not None and not ok(v):
                raise UserError(f"--{name.replace('_', '-')} must be {what}, got {v}")
    if args.embed_dim % args.n_head:
        raise UserError(f"--n-head {args.n_head} must divide --embed-dim {args.embed_dim}")
    if args.algo == "qgrpo" and (args.full_episodes or args.traj_len is not None or args.eval_len is not None):
        raise UserError("--algo qgrpo scores single actions with its critic: --full-episodes, --traj-len and "
                        "--eval-len are GRPO's rollouts from resets")
    if args.resume is not None and args.init_checkpoint is not None:
        raise UserError("--resume continues a run; --init-checkpoint starts a new one: give only one")
    if args.run_dir is not None and args.resume is None:
        check_run_dir(Path(args.run_dir))
    prefix = f"local/{env_family(args.env).lower()}-"
    if (args.dataset or "").startswith("local/") and not args.dataset.startswith(prefix):
        raise UserError(f"--dataset {args.dataset} would be built from {args.env} steps under another env's name; "
                        f"a local dataset for {args.env} must be named {prefix}...-vN, e.g. {prefix}random-v0")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {args.device!r} is not usable here ({str(e).splitlines()[0]})") from None


def make_env(env_id: str) -> gym.Env:
    """A Gymnasium MuJoCo env with a continuous (Box) action space, or a UserError saying why not."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise UserError(f"unknown environment {env_id!r} ({e})") from None
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda msg: None)  # HalfCheetah-v4's XML: "'settotalmass' is deprecated", per env
    try:
        with warnings.catch_warnings(action="ignore"):  # "Hopper-v4 is out of date": known, v4 is the D4RL-era env
            env = gym.make(spec)
    finally:
        mujoco.set_mju_user_warning(previous)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise UserError(f"{env_id} has a {type(env.action_space).__name__} action space; "
                        "the tanh-Gaussian policy needs a continuous Box action space")
    if not isinstance(getattr(env.unwrapped, "data", None), mujoco.MjData):
        raise UserError(f"{env_id} is not a MuJoCo environment; GRPO's exact resets need MuJoCo")
    if env_family(env_id) not in ENV_TABLE:
        raise UserError(f"no reference scores for {env_id}; supported families: {', '.join(ENV_TABLE)}")
    return env


DATASET_AUTHOR, RANDOM_ALGORITHM = "dt-grpo", "uniform-random"  # the metadata of the datasets this script builds


def is_random_id(dataset_id: str, env_id: str) -> bool:
    """Whether `dataset_id` names a dataset this script builds when missing: local/<env>-random-vN."""
    return re.fullmatch(rf"local/{env_family(env_id).lower()}-random-v\d+", dataset_id) is not None


def built_here(dataset_id: str) -> bool:
    """Whether the dataset on disk was built by `build_random_dataset`, by its metadata (not its name): only
    such a dataset may be deleted and rebuilt. Read as plain JSON, so that it answers for a damaged one too."""
    try:
        meta = json.loads((minari.storage.get_dataset_path(dataset_id) / "data" / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("author") == [DATASET_AUTHOR] and meta.get("algorithm_name") == RANDOM_ALGORITHM


@contextmanager
def dataset_lock(dataset_id: str):
    """An exclusive lock per dataset id, held while a random dataset is read or built: runs started together
    (seeds side by side) build it once, and none reads it half-written or while it is rebuilt [ours]."""
    path = str(minari.storage.get_dataset_path(dataset_id).resolve())  # in the temporary directory, not the user's
    with open(Path(tempfile.gettempdir()) / f"dt_grpo-{hashlib.sha1(path.encode()).hexdigest()[:16]}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run to finish building {dataset_id}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_dataset(dataset_id: str, env_id: str, buffers: list, algorithm_name: str, description: str,
                  code: str = "dt_grpo.py") -> None:
    """Write whole-episode `EpisodeBuffer`s as a Minari dataset (`minari.DataCollector` needs jax), author
    dt-grpo. Built under a temporary root and moved into place, so a killed build leaves no dataset behind;
    an existing copy is replaced only if this script built it (`built_here`). Also used by docs/make_dataset.py."""
    final, tmp_root = minari.storage.get_dataset_path(dataset_id), minari.storage.get_dataset_path() / f".building-{os.getpid()}"
    if final.exists() and not built_here(dataset_id):
        raise UserError(f"{final} holds a dataset this script did not build; it is left as it is")
    try:  # Minari reads its root from the environment on every call, and asks for author / permalink metadata
        with mock.patch.dict(os.environ, MINARI_DATASETS_PATH=str(tmp_root)), warnings.catch_warnings(action="ignore"):
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id, buffer=buffers, env=env_id, algorithm_name=algorithm_name, author=DATASET_AUTHOR,
                author_email="none", code_permalink=code, data_format="hdf5", description=description)
        shutil.rmtree(final, ignore_errors=True)  # a partial or corrupt earlier copy of our own
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_root / dataset_id, final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def build_random_dataset(dataset_id: str, env_id: str, n_steps: int, seed: int = 0) -> None:
    """A Minari dataset of a uniform-random policy (the paper's low-quality data, D4RL's "random"). The seed
    is fixed, not the run's: every run builds the same dataset [ours]."""
    env, buffers, steps = make_env(env_id), [], 0
    env.action_space.seed(seed)
    with tqdm(total=n_steps, desc=f"building {dataset_id}", unit="step") as bar:
        while steps < n_steps:
            first_obs, _ = env.reset(seed=seed + len(buffers))
            transitions, done = [], False
            while not done:
                action = env.action_space.sample()
                obs, reward, terminated, truncated, _ = env.step(action)
                transitions.append((obs, action, reward, terminated, truncated))
                done = terminated or truncated
            obs, actions, rewards, terminations, truncations = map(np.array, zip(*transitions))
            buffers.append(EpisodeBuffer(id=len(buffers), seed=seed + len(buffers), actions=actions, rewards=rewards,
                                         observations=np.concatenate([first_obs[None], obs]), infos={},
                                         terminations=terminations, truncations=truncations))
            steps += len(rewards)
            bar.update(len(rewards))
    write_dataset(dataset_id, env_id, buffers, RANDOM_ALGORITHM, f"{steps} steps of a uniform-random policy on {env_id}, built by dt_grpo.py")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Without a network Minari's hub client retries for ~23 s; one short TCP connect tells first [ours]."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_episodes(dataset_id: str) -> tuple[minari.MinariDataset, list]:
    """The dataset and all its episodes; a truncated file may open and fail only when its episodes are read."""
    ds = minari.load_dataset(dataset_id)
    episodes = list(ds.iterate_episodes())
    if len(episodes) != ds.total_episodes:
        raise ValueError(f"{len(episodes)} of {ds.total_episodes} episodes readable")
    return ds, episodes


def unreadable(dataset_id: str, e: Exception, remedy: str) -> UserError:
    """The one line for a dataset on disk that cannot be read: which dataset, which file, and what to do."""
    data_dir = minari.storage.get_dataset_path(dataset_id) / "data"
    try:
        meta = json.loads((data_dir / "metadata.json").read_text())
        file = data_dir / ("main_data.hdf5" if meta.get("data_format") == "hdf5" else "")
    except (OSError, ValueError):
        file = data_dir / "metadata.json"
    return UserError(f"dataset {dataset_id!r} cannot be read: {file} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                     f"nothing was changed. Repair it, {remedy}, or pass another --dataset")


def load_local(args: Args, dataset_id: str) -> tuple[minari.MinariDataset, list]:
    """A `local/` dataset. Only a random one is built when missing, and rebuilt (loudly) when damaged, and
    only if its metadata says this script built it; any other is the user's, and is never touched [ours]."""
    path = minari.storage.get_dataset_path(dataset_id)
    if not is_random_id(dataset_id, args.env):
        if not path.exists():
            level = next((lv for lv in ("expert", "medium") if f"-{lv}-" in dataset_id), "medium")  # the builder's levels
            raise UserError(f"no dataset {dataset_id!r} under {path.parent}; this script builds only "
                            f"local/{env_family(args.env).lower()}-random-vN itself. Build a behaviour policy's data "
                            f"with `python docs/make_dataset.py --env {args.env} --level {level}`, or pass another --dataset")
        try:
            return read_episodes(dataset_id)
        except Exception as e:
            raise unreadable(dataset_id, e, f"or `minari delete {dataset_id}` it") from None
    with dataset_lock(dataset_id):
        if path.exists():
            try:
                return read_episodes(dataset_id)
            except Exception as e:
                if not built_here(dataset_id):
                    raise unreadable(dataset_id, e, f"or `minari delete {dataset_id}` it and run again to build it") from None
                log(f"dataset {dataset_id!r}, built by this script, is partial or corrupt ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]}).\n[dt_grpo] REBUILDING it from scratch.", loud=True)
        log(f"building {dataset_id}: {args.random_dataset_steps} uniform-random steps on {args.env}")
        build_random_dataset(dataset_id, args.env, args.random_dataset_steps)
        return read_episodes(dataset_id)


def load_data(args: Args, env: gym.Env) -> tuple[Dataset, str]:
    """Find the dataset (cache, then the Minari hub; the default falls back, loudly, to a local
    random one when the hub cannot be reached), read it (`load_local` builds only what it may),
    check it fits the env and flatten it for window sampling."""
    family = env_family(args.env)
    dataset_id, local_id = args.dataset or ENV_TABLE[family]["dataset"], f"local/{family.lower()}-random-v0"
    if not dataset_id.startswith("local/") and not minari.storage.get_dataset_path(dataset_id).exists():
        if hub_reachable():
            try:
                minari.load_dataset(dataset_id, download=True)
            except Exception as e:
                raise UserError(f"cannot download dataset {dataset_id!r}: {e}") from None
        elif args.dataset is not None:
            raise UserError(f"dataset {args.dataset!r} is not cached and the Minari hub cannot be reached; "
                            f"use --dataset {local_id} to pretrain on a locally built random dataset")
        else:
            log(f"dataset {dataset_id!r} is not cached and the Minari hub cannot be reached.\n[dt_grpo] FALLING "
                f"BACK to {local_id!r}: a uniform-random policy on {args.env} (built once, then reused).\n"
                f"[dt_grpo] Scores are then those of the low-quality-data setting, not of {dataset_id}.", loud=True)
            dataset_id = local_id
    if dataset_id.startswith("local/"):
        ds, episodes = load_local(args, dataset_id)
    else:
        try:
            ds, episodes = read_episodes(dataset_id)
        except Exception as e:
            raise unreadable(dataset_id, e, f"or `minari delete {dataset_id}` it and run again to download it") from None
    spaces = (ds.observation_space.shape, ds.action_space.shape)
    if spaces != (env.observation_space.shape, env.action_space.shape):
        raise UserError(f"dataset {dataset_id} does not fit {args.env}: its observations/actions are {spaces[0]}/"
                        f"{spaces[1]}, the env's {env.observation_space.shape}/{env.action_space.shape}")
    if ds.spec.env_spec is not None and ds.spec.env_spec.id != args.env:
        log(f"dataset {dataset_id} was recorded on {ds.spec.env_spec.id} and we finetune on {args.env}; spaces match")
    data = Dataset.from_episodes(episodes, args.reward_scale, env.action_space)
    log(f"dataset {dataset_id}: {len(data.episode_returns)} episodes, {len(data.rtg)} steps, "
        f"return mean {data.episode_returns.mean():.1f} max {data.episode_returns.max():.1f}")
    return data, dataset_id


class Metrics:
    """metrics.csv: one row per logged event, blank where n/a; a new key is a new column, so a
    new diagnostic is one more key in a stats dict. Rewritten whole and atomically at each row.
    On resume it keeps the first `keep_rows` rows (those the checkpoint had seen)."""

    def __init__(self, path: Path, keep_rows: Optional[int] = None, elapsed_s: float = 0.0):
        self.path, self.t_start = path, time.time() - elapsed_s
        self.fields, self.rows = ["phase", "step", "env_steps", "wall_time_s"], []
        if keep_rows is not None:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields, self.rows = list(reader.fieldnames), list(reader)[:keep_rows]

    def elapsed(self) -> float:
        return time.time() - self.t_start

    def write(self, **row) -> None:
        self.rows.append(dict(row, wall_time_s=round(self.elapsed(), 2)))
        self.fields += [k for k in self.rows[-1] if k not in self.fields]
        with open(self.path.with_suffix(".tmp"), "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.path.with_suffix(".tmp"), self.path)

    def column(self, phase: str, key: str) -> tuple[list, list]:
        rows = [r for r in self.rows if r["phase"] == phase and r.get(key) not in (None, "")]
        return [int(r["env_steps"]) for r in rows], [float(r[key]) for r in rows]


def plot_curves(metrics: Metrics, env_id: str) -> None:
    """curves.png beside metrics.csv: the score against env steps, and below it the diagnostics of
    the online updates (clip fraction, |log ρ|, entropy estimate)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe inside a notebook

    online = next((r["phase"] for r in metrics.rows if r["phase"] in ("grpo", "qgrpo", "odt")), "grpo")
    fig = Figure(figsize=(8, 6), layout="constrained")
    score, diagnostics = fig.subplots(2, 1, sharex=True)
    score.plot(*metrics.column("eval", "norm_score"), "o-")
    for key in ("clip_frac", "abs_log_ratio", "entropy"):
        diagnostics.plot(*metrics.column(online, key), label=key)
    score.set(ylabel="normalised score", title=f"{env_id}: {metrics.path.parent.name}")
    diagnostics.set(xlabel="online env steps", yscale="symlog")
    diagnostics.legend(loc="upper right")
    fig.savefig(metrics.path.with_name("curves.png"), dpi=80)


class Checkpointer:
    """`checkpoint.pt`: all that a bit-identical continuation needs (args, weights, temperature, optimiser
    and RNG states, counters, the ODT buffer, how many metrics rows it has seen), written atomically between
    updates: every --checkpoint-interval seconds, at each evaluation, and on Ctrl-C, which only sets a flag
    so that the update in flight finishes first. Non-finite weights are never written [ours]."""

    def __init__(self, run_dir: Path, args: Args, dataset_id: str, model: DecisionTransformer, data: Dataset,
                 log_temp: torch.Tensor, metrics: Metrics, gen: torch.Generator, rng: np.random.Generator):
        self.path, self.args, self.dataset_id, self.model, self.data = run_dir / "checkpoint.pt", args, dataset_id, model, data
        self.log_temp, self.metrics, self.gen, self.rng = log_temp, metrics, gen, rng
        self.info: dict = {}  # run-level facts carried across resumes (pretrained score, timings)
        self.last, self.last_time, self.stop = "none", time.time(), False

    def on_sigint(self, signum, frame) -> None:
        if self.stop:  # second Ctrl-C: quit now, keeping the last periodic checkpoint
            raise KeyboardInterrupt
        self.stop = True
        log("Ctrl-C: saving a checkpoint after the current update (Ctrl-C again to quit without it)")

    def save(self, phase: str, **progress) -> None:
        for name, p in self.model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteError(f"weights {name} are not finite; not saved")
        torch.save(dict(args=dataclasses.asdict(self.args), dataset=self.dataset_id, phase=phase,
                        model=self.model.state_dict(), log_temp=self.log_temp.detach().cpu(),
                        state_mean=self.data.state_mean, state_std=self.data.state_std, info=self.info,
                        metrics_rows=len(self.metrics.rows), elapsed_s=self.metrics.elapsed(),
                        rng=dict(torch=torch.get_rng_state(), gen=self.gen.get_state(), numpy=self.rng.bit_generator.state),
                        **progress), self.path.with_suffix(".tmp"))
        os.replace(self.path.with_suffix(".tmp"), self.path)
        self.last, self.last_time = f"{self.path} ({phase} step {progress['step']})", time.time()

    def maybe_save(self, phase: str, force: bool = False, **progress) -> None:
        """Save if forced, due, or asked by Ctrl-C; after a Ctrl-C, stop the run (exit code 130)."""
        if force or self.stop or time.time() - self.last_time >= self.args.checkpoint_interval:
            self.save(phase, **progress)
        if self.stop:
            log(f"interrupted: checkpoint saved to {self.path}; continue with "
                f"`python dt_grpo.py --resume {self.path.parent}`")
            sys.exit(130)


RUN_FILES = ("metrics.csv", "checkpoint.pt", "pretrained.pt", "summary.json")  # a directory with any of them holds a run


def check_run_dir(run_dir: Path) -> None:
    if any((run_dir / name).exists() for name in RUN_FILES):
        raise UserError(f"--run-dir {run_dir} holds a run, which is left as it is; continue it with "
                        f"`--resume {run_dir}`, or give another --run-dir")


def new_run_dir(args: Args) -> Path:
    """Claim a directory for a new run: --run-dir, which must not hold a run, or a new time-stamped one
    (`_2`, `_3`, ... after runs started in the same second). Claiming is atomic (exclusive create):
    two runs never share a directory."""
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            (run_dir / "metrics.csv").open("x").close()  # the first file a run writes
        except FileExistsError:
            check_run_dir(run_dir)
        return run_dir
    stem = f"runs/{args.env}__{args.algo}__seed{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        run_dir = Path(stem if n == 1 else f"{stem}_{n}")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"{stem}: 999 runs started in the same second; give --run-dir")


def load_checkpoint(path: Path, args: Args) -> tuple[dict, Args]:
    """A checkpoint, loaded with weights_only=True, and the args to run with: with --resume the
    run's own (a flag given beside it must repeat the run's value), otherwise `args`."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}" if not args.resume else f"--resume {args.resume}: " +
                        ("the directory holds no checkpoint.pt" if path.parent.is_dir() else "no such run directory"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = Args(**ckpt["args"]) if args.resume else args
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for f in dataclasses.fields(Args) if args.resume else ():
        given = getattr(args, f.name)
        if f.name != "resume" and given != f.default and given != getattr(saved, f.name):
            raise UserError(f"--resume continues a run with its own args, but --{f.name.replace('_', '-')} {given} "
                            f"differs from the run's {getattr(saved, f.name)}; drop the flag")
    return ckpt, dataclasses.replace(saved, resume=args.resume)


def run(args: Args) -> dict:
    """The pipeline: data, pretraining (or a checkpoint's weights), evaluation, online finetuning,
    summary; or the continuation of an interrupted run (--resume)."""
    check_args(args)
    t_start, start_from = time.time(), None
    if args.resume is not None:
        start_from, args = load_checkpoint(Path(args.resume) / "checkpoint.pt", args)
        log(f"resuming {args.resume} from its {start_from['phase']} checkpoint at step {start_from['step']}")
    elif args.init_checkpoint is not None:
        start_from, _ = load_checkpoint(Path(args.init_checkpoint), args)
    resume = start_from if args.resume else None
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    env = make_env(args.env)
    target = args.target_return if args.target_return is not None else ENV_TABLE[env_family(args.env)]["target"]
    data, dataset_id = load_data(args, env)
    data_time_s = time.time() - t_start
    data_score = float(normalised_score(args.env, data.episode_returns).mean())
    args = env_defaults(keep_defaults(args, data_score))
    log(f"the data's mean normalised return: {data_score:.1f}; trust region: " +
        (f"--target-kl {args.target_kl}" if args.target_kl else "off") + f"; --eval-len {args.eval_len}")
    if start_from is not None:  # same env, dataset (its state normalisation) and model shape
        diffs = [f"--{k.replace('_', '-')} {start_from['args'].get(k)} (this run: {getattr(args, k)})"
                 for k in ("env", "context_len", "embed_dim", "n_layer", "n_head") if start_from["args"].get(k) != getattr(args, k)]
        diffs += [f"dataset {start_from['dataset']} (this run: {dataset_id})"] if start_from["dataset"] != dataset_id else []
        if diffs:
            raise UserError(f"checkpoint {args.resume or args.init_checkpoint} does not fit this run; it has " + ", ".join(diffs))
    run_dir = Path(args.resume) if args.resume else new_run_dir(args)
    log(f"run directory: {run_dir}")
    metrics = Metrics(run_dir / "metrics.csv", *((resume["metrics_rows"], resume["elapsed_s"]) if resume else ()))
    model = make_model(args, data.states.shape[1], data.actions.shape[1], env.spec.max_episode_steps)
    log_temp = start_from["log_temp"].clone() if start_from else torch.tensor(math.log(args.init_temperature))
    log_temp = log_temp.to(args.device).requires_grad_(True)
    if start_from is not None:
        model.load_state_dict(start_from["model"])
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    players = dict(grpo=args.reset_points * args.group_size, qgrpo=Q_EPISODES, odt=args.odt_episodes)[args.algo]
    envs = [make_env(args.env) for _ in range(max(args.eval_episodes, players))]
    saver = Checkpointer(run_dir, args, dataset_id, model, data, log_temp, metrics, gen, rng)
    if resume is not None:
        torch.set_rng_state(resume["rng"]["torch"])
        gen.set_state(resume["rng"]["gen"])
        rng.bit_generator.state = resume["rng"]["numpy"]
        saver.info = resume["info"]
    phase = resume["phase"] if resume else "online" if start_from else "pretrain"
    previous_handler = signal.signal(signal.SIGINT, saver.on_sigint)
    try:
        if phase == "pretrain":
            pretrain(args, model, data, metrics, gen, log_temp, saver, resume)
        if resume is None or phase == "pretrain":  # evaluate the starting policy, then checkpoint it
            returns, forward, fell = evaluate(args, model, envs, data, target)
            saver.info.update(pretrained_score=float(normalised_score(args.env, returns).mean()),
                              pretrain_time_s=metrics.elapsed())
            metrics.write(phase="eval", step=0, env_steps=0, norm_score=saver.info["pretrained_score"],
                          eval_forward=forward.mean(), eval_fell=fell.mean(), **{"return": returns.mean()})
            log(f"starting policy: return {returns.mean():.1f}, normalised score {saver.info['pretrained_score']:.1f}")
            saver.maybe_save("online", force=True, step=0)
            if start_from is None:
                shutil.copyfile(saver.path, run_dir / "pretrained.pt")
        final_score, env_steps = saver.info["pretrained_score"], 0
        if args.online_steps > 0:
            final_score, env_steps = finetune(args, model, log_temp, envs, data, metrics, saver, target, gen, rng,
                                              resume if phase == "online" else None)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}. Last good checkpoint: {saver.last}") from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    plot_curves(metrics, args.env)
    wall, online = metrics.elapsed(), [r for r in metrics.rows if r["phase"] == args.algo]
    scores = metrics.column("eval", "norm_score")[1]
    summary = dict(env=args.env, dataset=dataset_id, algo=args.algo, seed=args.seed, data_score=data_score,
                   target_kl=args.target_kl, eval_len=args.eval_len, pretrained_score=saver.info["pretrained_score"],
                   final_score=final_score, online_env_steps=env_steps,
                   # gait-keeping: evaluations more than 10 below the one before, and how far the last is below the best
                   eval_drops=sum(b < a - 10 for a, b in zip(scores, scores[1:])), gap_to_best=max(scores) - scores[-1],
                   pretrain_time_s=saver.info["pretrain_time_s"], online_time_s=wall - saver.info["pretrain_time_s"],
                   wall_time_s=wall, data_time_s=data_time_s,
                   # to compare machines and versions: the speed of rollouts and updates, and the peak memory
                   rollout_env_steps_per_s=env_steps / max(sum(float(r["rollout_s"]) for r in online), 1e-9) if online else 0.0,
                   update_s_per_iteration=float(np.mean([float(r["update_s"]) for r in online])) if online else 0.0,
                   peak_memory_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # this process (Linux: KiB)
    summary = {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + "\n".join(f"{k:<26}{v}" for k, v in summary.items()) + f"\n{'outputs':<26}{run_dir}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: parse the flags (`argv`, default sys.argv), run, and return the exit code."""
    try:
        run(tyro.cli(Args, args=argv))
    except (UserError, NonFiniteError) as e:  # bad input: exit code 2; a non-finite update: 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
