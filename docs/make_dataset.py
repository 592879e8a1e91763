"""Build a D4RL-like behaviour-policy dataset for dt_grpo.py, offline: `local/<env>-<level>-v0`.

As Minari's own MuJoCo datasets were made (Farama's minari-dataset-generation-scripts): train a
stable-baselines3 policy, then record env steps of its *stochastic* policy into a Minari dataset. Training
stops as soon as the stochastic policy's evaluation return reaches the level (or at --max-train-steps, with
a loud line saying what it reached). The metadata names the algorithm, its training steps and the
behaviour return; the trained policy is kept beside the runs, in a new directory of runs/datasets/.

Levels, the mean episode return of the data:
  medium  D4RL's medium data, a policy at about a third of expert: Hopper 1420, Walker2d 2850, HalfCheetah 4770
  expert  Hopper 3000: the level of Minari's mujoco/hopper/medium-v0 (SAC, ~3480), which the default command
          pretrains on where it can download it

Install (optional; pins the torch of requirements.txt) and run, from the repository root:
    pip install -r docs/requirements-datasets.txt
    python docs/make_dataset.py --env Hopper-v4 --level medium
    python dt_grpo.py --env Hopper-v4 --dataset local/hopper-medium-v0

An existing dataset is never overwritten: `minari delete` it first. Commands and wall-clock: docs/study.md#datasets.
"""

import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

import minari
import numpy as np
import stable_baselines3
import torch
import tyro
from minari.data_collector import EpisodeBuffer
from stable_baselines3 import PPO, SAC
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dt_grpo as D  # noqa: E402

LEVELS = {"medium": {"Hopper": 1420.0, "Walker2d": 2850.0, "HalfCheetah": 4770.0}, "expert": {"Hopper": 3000.0}}
# The algorithm that reached the level sooner on this 2-core CPU (docs/study.md#datasets): PPO takes ~1250 env steps/s
# on one core against SAC's ~76, and needs more steps, but far fewer than 18 times more on Hopper and Walker2d;
# default PPO is slow to learn HalfCheetah's gait, which SAC reaches in 80k steps.
FASTEST = {"Hopper": "ppo", "Walker2d": "ppo", "HalfCheetah": "sac"}


@dataclass
class Args:
    """Train a behaviour policy and record its data as local/<env>-<level>-v0."""
    env: str = "Hopper-v4"
    """Gymnasium MuJoCo env, as for dt_grpo.py (the data is recorded on it)."""
    level: Literal["medium", "expert"] = "medium"
    """Mean return the behaviour policy must reach (see the table above)."""
    algo: Optional[Literal["sac", "ppo"]] = None
    """SAC (as Minari's and D4RL's data: tanh-squashed actions) or PPO (clipped Gaussian: many actions at ±1);
    default: the one that got there sooner here, PPO on Hopper and Walker2d, SAC on HalfCheetah."""
    record_steps: int = 1_000_000
    """Env steps recorded (D4RL and Minari: 1M); whole episodes, so slightly more."""
    max_train_steps: int = 2_000_000
    """Give up training here and record the policy as it is, saying so loudly."""
    check_every: int = 10_000
    """Training steps between evaluations of the stochastic policy."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    policy: Optional[str] = None
    """Record from this saved stable-baselines3 policy (.zip) instead of training one."""
    seed: int = 0
    """Seed of training; recorded episodes are seeded from 123 upward, as Minari's."""
    threads: int = 1
    """Torch threads (SAC's small updates gain little from a second core: run two builds side by side)."""


def play(policy, env_id: str, seeds: Iterable[int], max_steps: float = math.inf, desc: Optional[str] = None) -> list:
    """Whole episodes of the stochastic policy, 16 envs in lock-step with batched actions, one per seed until
    the seeds run out or max_steps have been taken. Returns EpisodeBuffers of the actions the env received
    (PPO's clipped to the bounds)."""
    envs = [D.make_env(env_id) for _ in range(16)]
    seeds, buffers, steps = iter(seeds), [], 0
    running = {}  # env index -> [seed, first observation, transitions]
    bar = tqdm(total=None if math.isinf(max_steps) else max_steps, desc=desc, unit="step", disable=desc is None)
    while True:
        for i, env in enumerate(envs):  # start episodes on idle envs while the budget lasts
            seed = next(seeds, None) if i not in running and steps < max_steps else None
            if seed is not None:
                running[i] = [seed, env.reset(seed=seed)[0], []]
        if not running:
            break
        idx = sorted(running)
        obs = np.stack([running[i][2][-1][0] if running[i][2] else running[i][1] for i in idx])
        actions, _ = policy.predict(obs, deterministic=False)
        for i, a in zip(idx, actions):
            o, r, terminated, truncated, _ = envs[i].step(a)
            running[i][2].append((o, a, r, terminated, truncated))
            steps += 1
            if terminated or truncated:
                seed, first, tr = running.pop(i)
                o, a, r, term, trunc = map(np.array, zip(*tr))
                buffers.append(EpisodeBuffer(id=len(buffers), seed=seed, observations=np.concatenate([first[None], o]),
                                             actions=a.astype(np.float32), rewards=r, terminations=term,
                                             truncations=trunc, infos={}))
        bar.update(len(idx))
    bar.close()
    return buffers


def train(args: Args, target: float, out: Path):
    """The behaviour policy: trained in chunks of --check-every steps until its stochastic evaluation return
    reaches `target`. Saved after every chunk. Returns the policy, its training steps and its last return."""
    algo = dict(sac=SAC, ppo=PPO)[args.algo]
    model = algo("MlpPolicy", D.make_env(args.env), seed=args.seed, device="cpu", verbose=0,
                 **(dict(learning_starts=10_000) if args.algo == "sac" else {}))  # rl-zoo's SAC on MuJoCo
    bar, ret = tqdm(total=args.max_train_steps, desc=f"training {args.algo.upper()}", unit="step"), -np.inf
    log = open(out / "training.csv", "w")
    log.write("train_steps,eval_return,wall_s\n")
    t0 = time.time()
    while model.num_timesteps < args.max_train_steps and ret < target:
        model.learn(args.check_every, reset_num_timesteps=False)
        episodes = play(model, args.env, [10**6 + model.num_timesteps + i for i in range(args.eval_episodes)])
        ret = float(np.mean([ep.rewards.sum() for ep in episodes]))
        model.save(out / "policy.zip")
        log.write(f"{model.num_timesteps},{ret:.1f},{time.time() - t0:.0f}\n")
        log.flush()
        bar.update(model.num_timesteps - bar.n)
        bar.set_postfix(eval_return=f"{ret:.0f}", target=f"{target:.0f}")
    bar.close()
    if ret < target:
        D.log(f"{args.algo.upper()} reached an evaluation return of {ret:.0f} in {model.num_timesteps} steps, not "
              f"the {args.level} level's {target:.0f}; the data records this policy as it is", loud=True)
    return model, model.num_timesteps, ret


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    D.make_env(args.env)  # an unknown env: one line, before any work
    family = D.env_family(args.env)
    args = dataclasses.replace(args, algo=args.algo or FASTEST.get(family, "sac"))
    if family not in LEVELS[args.level]:
        raise D.UserError(f"no {args.level} level for {family}; levels: " +
                          ", ".join(f"{lv} ({', '.join(t)})" for lv, t in LEVELS.items()))
    dataset_id, target = f"local/{family.lower()}-{args.level}-v0", LEVELS[args.level][family]
    if minari.storage.get_dataset_path(dataset_id).exists():
        raise D.UserError(f"dataset {dataset_id} exists and is left as it is; `minari delete {dataset_id}` to build it anew")
    stem = Path("runs/datasets") / f"{family.lower()}-{args.level}-{args.algo}-seed{args.seed}"
    out = next(p for p in (stem.with_name(f"{stem.name}{f'_{n}' if n > 1 else ''}") for n in itertools.count(1))
               if not p.exists())  # an earlier build's policy is kept, never overwritten
    out.mkdir(parents=True)
    t0 = time.time()
    if args.policy is not None:
        policy, train_steps, ret = dict(sac=SAC, ppo=PPO)[args.algo].load(args.policy, device="cpu"), None, None
    else:
        policy, train_steps, ret = train(args, target, out)
    train_s = time.time() - t0
    buffers = play(policy, args.env, itertools.count(123), args.record_steps, f"recording {dataset_id}")
    returns = np.array([ep.rewards.sum() for ep in buffers])
    steps = sum(len(ep.rewards) for ep in buffers)
    name = f"{args.algo.upper()} (stable-baselines3 {stable_baselines3.__version__})"
    trained = f"trained {train_steps} steps to an evaluation return of {ret:.0f}" if ret is not None else f"loaded from {args.policy}"
    D.write_dataset(dataset_id, args.env, buffers, name, f"{steps} steps of the stochastic policy of {name} on {args.env}, "
                    f"{trained} (level {args.level}: {target:.0f}); built by docs/make_dataset.py", code="docs/make_dataset.py")
    minari.load_dataset(dataset_id).storage.update_metadata(dict(
        behaviour_training_steps=train_steps, behaviour_eval_return=ret, behaviour_mean_return=float(returns.mean())))
    score = D.normalised_score(args.env, returns)
    print(f"{dataset_id}: {len(buffers)} episodes, {steps} steps, return {returns.mean():.0f} ± {returns.std():.0f} "
          f"(normalised {score.mean():.1f}), {(np.abs(np.concatenate([ep.actions for ep in buffers])) >= 1).mean():.0%} "
          f"of action entries at ±1; training {train_s / 60:.1f} min, in all {(time.time() - t0) / 60:.1f} min; "
          f"policy in {out}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except D.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
