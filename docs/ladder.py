"""Rung 0b of the learning ladder (docs/study.md, "The learning ladder"): does a GRPO update carry
signal on a real task, at fixed weights?

  * the policy gradients of independent batches agree: their mean pairwise cosine is > 0
    (near 0 means the gradient is noise, which Adam turns into steps in random directions);
  * an update with the true advantages raises the mean group score, and one with negated
    advantages lowers it, from the same weights, scored on the same reset points and seeds.

Run from the repository root, on a run's pretrained model, with the flags of that run:

    python docs/ladder.py runs/<run>/pretrained.pt --env HalfCheetah-v4 --dataset local/halfcheetah-random-v0

Any flag of dt_grpo.py sets the GRPO settings under test (e.g. --traj-len 10 --group-size 32).
"""

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dt_grpo as D  # noqa: E402

PAIRS, UPDATES = 3, 1  # batch pairs for the cosine; GRPO iterations for the sign check


def gradient(args: D.Args, model: D.DecisionTransformer, batch: D.GroupBatch) -> torch.Tensor:
    """The gradient of the clipped surrogate at ratio 1 (no entropy term), flattened."""
    model.zero_grad(set_to_none=True)
    logp, _ = D.batch_log_probs(model, batch, torch.arange(len(batch.adv)))
    loss, _ = D.grpo_policy_loss(logp, batch.logp_old, batch.valid.float(), batch.adv, args.ratio, args.clip_eps)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def group_score(args, model, envs, data, target, seed: int) -> float:
    """Mean group score of one iteration's collection with fixed random streams (common random numbers)."""
    batch, _ = D.collect_groups(args, model, envs, data, target, torch.Generator().manual_seed(seed),
                                np.random.default_rng(seed))
    return batch.scores.mean().item()


def main(checkpoint: str, args: D.Args) -> None:
    env = D.make_env(args.env)
    data, _ = D.load_data(args, env)
    model = D.make_model(args, data.states.shape[1], data.actions.shape[1], env.spec.max_episode_steps).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    envs = [D.make_env(args.env) for _ in range(args.reset_points * args.group_size)]
    target = args.online_target_return if args.online_target_return is not None else D.ENV_TABLE[D.env_family(args.env)]["target"]
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)

    grads = [gradient(args, model, D.collect_groups(args, model, envs, data, target, gen, rng)[0]) for _ in range(2 * PAIRS)]
    cos = [torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0).item()
           for i in range(len(grads)) for j in range(i + 1, len(grads))]
    print(f"gradient cosine between independent batches: {np.mean(cos):+.3f} ± {np.std(cos):.3f} ({len(cos)} pairs)")

    before = np.mean([group_score(args, model, envs, data, target, 100 + i) for i in range(2)])
    for sign in (+1, -1):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=args.online_lr, weight_decay=args.weight_decay)
        g, r = torch.Generator().manual_seed(7), np.random.default_rng(7)
        for _ in range(UPDATES):
            batch, _ = D.collect_groups(args, m, envs, data, target, g, r)
            D.grpo_update(args, m, opt, dataclasses.replace(batch, adv=sign * batch.adv), g)
        after = np.mean([group_score(args, m, envs, data, target, 100 + i) for i in range(2)])
        print(f"advantages x {sign:+d}: mean group score {before:.2f} -> {after:.2f} ({after - before:+.2f})")


if __name__ == "__main__":
    checkpoint, rest = sys.argv[1], sys.argv[2:]
    main(checkpoint, D.env_defaults(tyro.cli(D.Args, args=rest)))
