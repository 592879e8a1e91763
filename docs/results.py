"""The README's results table and figure (docs/results.png) from finished runs, e.g.

    python docs/results.py runs/final        # expects runs/final/<env>_<setting>_s<seed>/

Each run directory holds a metrics.csv written by dt_grpo.py. Runs are grouped by everything
before "_s<seed>"; a cell is the mean ± std over seeds of each seed's first evaluation at or
past the mark (iterations overshoot the marks a little).
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

MARKS = (100_000, 300_000, 500_000, 1_000_000)
PUBLISHED = {  # Yan et al. 2024, Table 1, 500k env steps: ODT, ODT+TD3
    "hopper": (29.08, 76.13), "halfcheetah": (2.15, 59.35), "walker2d": (14.12, 57.86)}


def evaluations(run: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(run / "metrics.csv"))
    return [(int(r["env_steps"]), float(r["norm_score"])) for r in rows if r["phase"] == "eval"]


def at(ev: list, mark: int) -> float:
    return next((s for e, s in ev if e >= mark), np.nan)


def main(root: Path) -> None:
    groups = defaultdict(list)  # "<env>_<setting>" -> [evaluations of each seed]
    for run in sorted(root.glob("*_s[0-9]*")):
        if (run / "metrics.csv").exists():
            groups[re.sub(r"_s\d+$", "", run.name)].append(evaluations(run))
    print("| run (seeds) | start | " + " | ".join(f"{m // 1000}k" for m in MARKS) + " | best |")
    print("|" + " --- |" * (len(MARKS) + 3))
    for name, runs in groups.items():
        cells = []
        for m in (0, *MARKS):
            v = np.array([at(ev, m) for ev in runs])
            v = v[~np.isnan(v)]
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}" + (f" ({len(v)})" if 0 < len(v) < len(runs) else "") if len(v) else "")
        best = np.mean([max(s for _, s in ev) for ev in runs])
        print(f"| {name} ({len(runs)}) | " + " | ".join(cells) + f" | {best:.1f} |")

    envs = sorted({name.split("_")[0] for name in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for i, (name, runs) in enumerate((n, r) for n, r in groups.items() if n.split("_")[0] == env):
            xs = np.arange(0, max(ev[-1][0] for ev in runs) + 1, 25_000)
            S = np.array([[at(ev, x) for x in xs] for ev in runs])
            ok = ~np.isnan(S).any(0)
            for ev in runs:
                ax.plot(*zip(*ev), lw=0.6, alpha=0.35, color=f"C{i}")
            ax.plot(xs[ok], S[:, ok].mean(0), "-", lw=2, color=f"C{i}", label=f"{name.split('_', 1)[1]} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        odt, td3 = PUBLISHED.get(env.lower(), (None, None))
        if odt is not None:
            ax.axhline(odt, color="k", ls=":", label=f"ODT, published ({odt})")
            ax.axhline(td3, color="k", ls="--", label=f"ODT+TD3, published ({td3})")
        ax.set(title=f"{env}-random", xlabel="online env steps", ylabel="D4RL-normalised score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "results.png", dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
