"""Validation-loss curves of saved runs on one plot, against epochs of training.

    python benchmarks/val_curves.py --out FIG.png [--title TEXT] LABEL=RUN_DIR [LABEL=RUN_DIR ...]

For runs of one comparison made by separate `fedtune compare --regimes R` calls (say
the federated run at one time and centralized at another), which `fedtune compare`'s
own figure (a) cannot draw together. Each RUN_DIR is a run folder (the one holding
`metrics.jsonl` and `config.json`); a centralized or local-only run is plotted per
evaluation at its epoch, a federated run per round at `round x federated.local_epochs`
epochs, so runs of the same budget end at the same x. Each run's lowest validation
loss (the model it tests) is marked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedtune.federated.compare import val_curve
from fedtune.runs import CONFIG_FILE, METRICS_FILE


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(epochs of training, validation loss) of a saved run, in order."""
    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise SystemExit(f"{run_dir} is not a run folder (no metrics.jsonl and config.json); "
                         "give the folder `fedtune run/compare` printed for the run")  # fmt: skip
    points = val_curve(run_dir)
    if not points:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation loss to plot")
    return points


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    labelled = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            sys.exit(
                f"{item!r}: give each run as LABEL=RUN_DIR, e.g. federated=runs/x/ptuning-federated"
            )
        labelled.append((label, curve(Path(path))))
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for label, pts in labelled:
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=label)
        best = min(pts, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], "o", mfc="none", ms=9, color=line.get_color())
    ax.set_xlabel("epochs of training (federated: rounds x local epochs)")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if args.title:
        ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
