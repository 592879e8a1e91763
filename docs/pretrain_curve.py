"""The starting score along one pretraining run: what `dt_grpo.py --pretrain-steps N --online-steps 0` would
report for every N in --every, 2 --every, ..., from one run instead of one run each (the same numbers: the
evaluation draws no random numbers that pretraining uses, and dropout is back on after it).

    python docs/pretrain_curve.py --env Hopper-v4 --dataset local/hopper-medium-v0 --pretrain-steps 20000 --every 2000

Any dt_grpo.py flag applies (--batch-size, --lr, ...). Writes runs/pretrain_curve/<dataset>__<flags>.csv:
updates, wall_s, score (normalised), return. Results and commands: docs/study.md#pretraining.
"""

import math
import sys
import time
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dt_grpo as D  # noqa: E402


class EvaluateEvery:
    """Stands in for dt_grpo's Checkpointer, whose maybe_save pretraining calls after every update."""

    def __init__(self, every: int, evaluate, out: Path):
        self.every, self.evaluate, self.out, self.t0 = every, evaluate, out, time.time()
        out.write_text("updates,wall_s,score,return\n")

    def maybe_save(self, phase: str, step: int, **_) -> None:
        if step % self.every == 0:
            t = time.time() - self.t0
            score, ret = self.evaluate()
            with self.out.open("a") as f:
                f.write(f"{step},{t:.0f},{score:.1f},{ret:.0f}\n")
            D.log(f"{step} updates ({t / 60:.1f} min): score {score:.1f}, return {ret:.0f}")


def main(argv: list[str]) -> None:
    i = argv.index("--every")  # this tool's one flag; the rest are dt_grpo.py's
    every, args = int(argv[i + 1]), tyro.cli(D.Args, args=argv[:i] + argv[i + 2:])
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    env = D.make_env(args.env)
    args = D.env_defaults(args)
    data, dataset_id = D.load_data(args, env)
    target = args.target_return if args.target_return is not None else D.ENV_TABLE[D.env_family(args.env)]["target"]
    model = D.make_model(args, data.states.shape[1], data.actions.shape[1], env.spec.max_episode_steps)
    log_temp = torch.tensor(math.log(args.init_temperature)).requires_grad_(True)  # float32, as in dt_grpo.run
    envs = [D.make_env(args.env) for _ in range(args.eval_episodes)]

    def evaluate():
        returns, _, _ = D.evaluate(args, model, envs, data, target)
        model.train()  # evaluation switched dropout off
        return float(D.normalised_score(args.env, returns).mean()), float(returns.mean())

    out = Path("runs/pretrain_curve") / ("__".join(argv).replace("--", "").replace("/", "_") + ".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    D.pretrain(args, model, data, D.Metrics(out.with_suffix(".metrics.csv")), gen, log_temp, EvaluateEvery(every, evaluate, out))
    print(out.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
