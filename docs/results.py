"""The README's results figure (docs/results.png) and a table of finished runs, e.g.

    python docs/results.py runs/head runs/medium   # random data, then medium; each <env>_<setting>_s<seed>/

Each run directory holds a metrics.csv written by dt_grpo.py. Runs are grouped by everything
before "_s<seed>"; a cell is the mean ± std over seeds of each seed's first evaluation at or
past the mark (iterations overshoot the marks a little). The figure draws those runs' curves, and
as points (mean ± std at the marks) the README's rows whose run directories are not kept here
(their curves: docs/results_grpo.png and the study), and the published numbers as lines.
"""

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MARKS = (100_000, 300_000, 500_000)
LABELS = {"grpo": "GRPO, defaults", "notr": "GRPO, --target-kl 0", "kl02": "GRPO, --target-kl 0.02",  # <env>_<setting>:
          "ev200": "GRPO, --eval-len 200", "ev400": "GRPO, --eval-len 400", "odt": "ODT here"}  # the legend
PUBLISHED = {  # Yan et al. 2024, Table 1, 500k env steps: ODT, ODT+TD3, TD3; random data, then medium
    "random": {"hopper": (29.08, 76.13, 75.68), "halfcheetah": (2.15, 59.35, 68.55), "walker2d": (14.12, 57.86, 69.91)},
    "medium": {"hopper": (97.84, 89.07, 88.98), "halfcheetah": (42.27, 76.91, 70.9), "walker2d": (75.57, 97.86, 90.49)}}
TABLED = {  # the README's random-data rows whose runs are not kept here, (mean, std) at MARKS; None where not run
    "hopper": {"QGRPO (3 seeds)": [(11.0, 2.8), (12.1, 3.9), (10.7, 4.5)],
               "ODT here (3 seeds)": [(3.0, 1.0), (6.9, 0.6), (7.9, 0.7)],
               "PPO from scratch (3 seeds)": [(20.9, 4.4), (65.8, 15.9), (56.5, 4.3)]},
    "halfcheetah": {"QGRPO (3 seeds)": [(2.7, 0.3), (10.9, 6.9), (14.5, 6.0)],
                    "ODT here (1 seed)": [(2.3, 0), (2.3, 0), (2.3, 0)],
                    "PPO from scratch (3 seeds)": [(4.7, 0.2), (11.0, 0.9), (11.8, 0.7)]},
    "walker2d": {"QGRPO (3 seeds)": [(8.9, 0.3), (12.9, 4.8), (15.1, 2.3)],
                 "ODT here (1 seed)": [(5.9, 0), None, None],
                 "PPO from scratch (3 seeds)": [(9.8, 3.0), (19.8, 6.3), (42.3, 10.3)]},
}


def evaluations(run: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(run / "metrics.csv"))
    return [(int(r["env_steps"]), float(r["norm_score"])) for r in rows if r["phase"] == "eval"]


def at(ev: list, mark: int) -> float:
    return next((s for e, s in ev if e >= mark), np.nan)


def table(root: Path) -> dict:
    """Print the markdown table of the runs under root; returns them, "<env>_<setting>" -> [evaluations]."""
    groups = defaultdict(list)
    for run in sorted(root.glob("*_s[0-9]*")):
        if (run / "metrics.csv").exists():
            groups[re.sub(r"_s\d+$", "", run.name)].append(evaluations(run))
    print(f"\n{root}\n\n| run (seeds) | start | " + " | ".join(f"{m // 1000}k" for m in MARKS) + " | best |")
    print("|" + " --- |" * (len(MARKS) + 3))
    for name, runs in groups.items():
        cells = []
        for m in (0, *MARKS):
            v = np.array([at(ev, m) for ev in runs])
            v = v[~np.isnan(v)]
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}" + (f" ({len(v)})" if 0 < len(v) < len(runs) else "") if len(v) else "")
        best = np.mean([max(s for _, s in ev) for ev in runs])
        print(f"| {name} ({len(runs)}) | " + " | ".join(cells) + f" | {best:.1f} |")
    return groups


def main(roots: list[Path]) -> None:
    envs = list(PUBLISHED["random"])
    fig, axes = plt.subplots(len(roots), len(envs), figsize=(5 * len(envs), 4 * len(roots)), squeeze=False)
    for row, root, data in zip(axes, roots, PUBLISHED):
        groups = table(root)
        for ax, env in zip(row, envs):
            tabled = TABLED[env] if data == "random" else {}
            for i, (label, cells) in enumerate(tabled.items()):
                xs, ms, ss = zip(*[(m, *c) for m, c in zip(MARKS, cells) if c is not None])
                ax.errorbar(xs, ms, ss, fmt="o-", ms=4, capsize=3, lw=1.2, color=f"C{i}", label=label)
            mine = sorted(((n, r) for n, r in groups.items() if n.split("_")[0] == env), key=lambda g: not g[0].endswith("_grpo"))
            for i, (name, runs) in enumerate(mine, len(tabled)):  # the defaults first: the same colour in every panel
                xs = np.arange(0, max(ev[-1][0] for ev in runs) + 1, 25_000)
                S = np.array([[at(ev, x) for x in xs] for ev in runs])
                ok = ~np.isnan(S).any(0)
                for ev in runs:
                    ax.plot(*zip(*ev), lw=0.6, alpha=0.35, color=f"C{i}")
                ax.plot(xs[ok], S[:, ok].mean(0), "-", lw=2, color=f"C{i}",
                        label=f"{LABELS.get(name.split('_', 1)[1], name)} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            for value, ls, method in zip(PUBLISHED[data][env], (":", "--", "-."), ("ODT", "ODT+TD3", "TD3")):
                ax.axhline(value, color="k", ls=ls, lw=1, label=f"{method}, published ({value})")
            ax.set(title=f"{env}-{data}", xlabel="online env steps", ylabel="D4RL-normalised score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "results.png", dpi=100)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
