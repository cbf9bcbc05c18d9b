"""Markdown reports and PNG plots of runs and comparisons (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from fedtune.evaluate import LABEL, Metrics

# The task metric computed between steps and rounds next to the validation loss
# (generation decodes the validation set only when train.select_by names a metric).
# Those on a 0..1 scale are plotted on the right axis; train.select_by's metric first.
VAL_METRICS = ("accuracy", "pair_accuracy", "rougeL")
UNIT_METRICS = (*VAL_METRICS, "macro_f1", "weighted_f1", "exact_match", "f1")


def _val_metric(records: list[dict[str, Any]], first: str = "") -> tuple[str, str]:
    """(record key, display name) of the validation metric every record has, else ('',
    ''): `first` (the metric that selects the model) when it is one."""
    keys = ([first] if first in UNIT_METRICS else []) + list(VAL_METRICS)
    for key in keys:
        if records and all(f"val_{key}" in r for r in records):
            return f"val_{key}", LABEL.get(key, key)
    return "", ""


def plot_curves(
    history: list[dict[str, Any]],
    path: Path,
    title: str,
    x: str = "step",
    train_label: str = "train loss",
    select_by: str = "",
) -> None:
    """Train and validation loss (left axis) and validation accuracy (right) per
    optimizer step, or per round (`x="round"`) for a federation; records without
    a value (round 0, an abandoned round) are skipped."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines = []
    trained = [r for r in history if "train_loss" in r]
    if trained:
        lines += ax.plot([r[x] for r in trained], [r["train_loss"] for r in trained], "o-",
                         label=train_label)  # fmt: skip
    with_val = [r for r in history if "val_loss" in r]
    if with_val:
        xs = [r[x] for r in with_val]
        lines += ax.plot(xs, [r["val_loss"] for r in with_val], "s-", label="validation loss")
        # The task's main metric when it is computed between steps (classification's
        # accuracy, preference's pair accuracy; generation's ROUGE-L only when
        # train.select_by asks for answers), or the metric that selects the model.
        # Round 0 (the untrained global model, never kept) is not decoded for it.
        scored = [r for r in with_val if r.get("round", 1) > 0]
        key, name = _val_metric(scored, select_by)
        if key:
            ax2 = ax.twinx()
            lines += ax2.plot([r[x] for r in scored], [r[key] for r in scored], "^--",
                              color="tab:green", label=f"validation {name}")  # fmt: skip
            ax2.set_ylabel(name)
            ax2.set_ylim(0, 1)
    ax.set_xlabel("optimizer step" if x == "step" else x)
    ax.set_ylabel("loss")
    ax.set_title(title)
    # One legend under the plot, so it never hides a curve.
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(m: Metrics, labels: tuple[str, ...], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.4, 4))
    ax.imshow(m.confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in m.confusion) or 1
    for i, row in enumerate(m.confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > peak / 2 else "black")  # fmt: skip
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{x:.4f}"


def test_section(m: Metrics, labels: tuple[str, ...]) -> str:
    """The test set's metrics, their breakdown (per class with the confusion matrix, or
    per category with generated samples) and the plots that go with them."""
    from fedtune.evaluate import LABEL

    names = list(m.values)
    head = "| " + " | ".join(LABEL.get(k, k) for k in names) + " | loss |"
    row = "| " + " | ".join(_pct(m.values[k]) for k in names) + f" | {m.loss:.4f} |"
    lines = [head, "|---" * (len(names) + 1) + "|", row, ""]
    if m.confusion:
        lines += [metrics_table(m, labels)]
    if m.report and not m.confusion:
        lines += ["| category | examples | " + " | ".join(LABEL.get(k, k) for k in names) + " |",
                  "|---" * (len(names) + 2) + "|"]  # fmt: skip
        lines += [f"| {c} | {r['n']} | " + " | ".join(_pct(r[k]) for k in names) + " |"
                  for c, r in m.report.items()]  # fmt: skip
    if m.samples:
        lines += ["", "Generated answers (the first test examples):", "",
                  "| instruction | reference | generated |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {table_cell(x['instruction'], 300)} | {table_cell(x['reference'], 300)} "
                  f"| {table_cell(x['prediction'], 300)} |" for x in m.samples]  # fmt: skip
    if m.answers:
        lines += ["", f"All {len(m.answers)} test answers with their scores: "
                  f"[{ANSWERS_FILE}]({ANSWERS_FILE})."]  # fmt: skip
    return "\n".join(lines)


ANSWERS_FILE = "answers.jsonl"


def write_answers(run_dir: Path, m: Metrics) -> None:
    """Generation: every test answer beside its reference and scores, one JSON per line
    (what a person reads to see where a model fails; benchmarks/paired.py compares runs
    by their scores)."""
    if m.answers:
        with (run_dir / ANSWERS_FILE).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in m.answers)


def metrics_table(m: Metrics, labels: tuple[str, ...]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in labels:
        r = m.report[name]
        lines.append(
            f"| {name} | {_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1-score'])} "
            f"| {int(r['support'])} |"
        )
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
    lines.append("| | " + " | ".join(labels) + " |")
    lines.append("|---" * (len(labels) + 1) + "|")
    for name, row in zip(labels, m.confusion, strict=True):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def write_run_report(run_dir: Path, summary: dict[str, Any], test: Metrics,
                     history: list[dict[str, Any]], labels: tuple[str, ...]) -> None:  # fmt: skip
    """`report.md`, `curves.png` and `confusion.png` in `run_dir`."""
    title = f"{summary['method']} on {summary['model']}"
    frozen = summary["kind"] == "frozen"  # no training curve: nothing was trained
    if not frozen:
        plot_curves(history, run_dir / "curves.png", title, select_by=s_by(summary))
    if test.confusion:
        plot_confusion(test, labels, run_dir / "confusion.png", f"test, {title}")
    write_answers(run_dir, test)
    s = summary
    early = " (stopped early)" if s["stopped_early"] else ""
    fitting = (
        ("fitting / evaluation", f"{s['train_seconds']:.1f} s fit, "
         f"{s['samples_per_second']:.1f} test examples/s")
        if frozen
        else ("optimizer steps / epochs", f"{s['steps']} / {s['epochs']:.2f}{early}")
    )  # fmt: skip
    facts = [
        ("method", f"`{s['method']}`"),
        ("base model", f"`{s['model']}` ({s['kind']})"),
        ("data", s["data"]),
        ("examples train / validation / test",
         f"{s['n_train']} / {s['n_validation']} / {s['n_test']}"),
        ("trainable parameters", f"{s['trainable_parameters']:,} "
         f"({s['trainable_percent']:.3f}% of {s['base_parameters']:,})"),
        fitting,
        *_kept(s, "step"),
        ("wall time", f"{s['wall_seconds']:.1f} s (training {s['train_seconds']:.1f} s, "
         f"{s['samples_per_second']:.1f} samples/s)"),
    ]  # fmt: skip
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts)
    text = f"""# Run {s["name"]}: {title}

| | |
|---|---|
{rows}

## Test set

{test_section(test, labels)}

{"" if frozen else "![training curves](curves.png)"}
{"![confusion matrix](confusion.png)" if test.confusion else ""}
"""
    if s.get("notes"):
        text += "\n## Data notes\n\n" + "\n".join(f"- {n}" for n in s["notes"]) + "\n"
    (run_dir / "report.md").write_text(text)


def s_by(s: dict[str, Any]) -> str:
    """What selected a run's model (`train.select_by`; runs before it: the loss)."""
    return str(s.get("select_by", "loss"))


def _kept(s: dict[str, Any], unit: str, loss_line: bool = True) -> list[tuple[str, str]]:
    """The report's line on the model kept: by the lowest validation loss, or by the
    metric `train.select_by` named (then its value and the loss it came with)."""
    by, at = s_by(s), s.get(f"best_{unit}", 0)
    if by == "loss":
        return [(f"best validation loss ({unit})", f"{s['best_val_loss']:.4f} ({at})")] * loss_line
    return [(f"kept: best validation {LABEL.get(by, by)} ({unit})",
             f"{s['best_val_score']:.4f} ({at}); its validation loss {s['best_val_loss']:.4f}")]


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def table_cell(text: str, limit: int = 0) -> str:
    """`text` fit for a markdown table cell: one line, no pipes, at most `limit`
    characters (cut before escaping, so a cut never splits an escape)."""
    one = " ".join(str(text).split())
    if limit and len(one) > limit:
        one = one[: limit - 1] + "…"
    return one.replace("|", "\\|")


def write_federated_report(
    run_dir: Path,
    s: dict[str, Any],
    test: Metrics,
    history: list[dict[str, Any]],
    labels: tuple[str, ...],
) -> None:
    """`report.md`, `rounds.png` and `confusion.png` of a federated run."""
    title = f"{s['method']} on {s['model']}, federated ({s['strategy']})"
    plot_curves(history, run_dir / "rounds.png", title, x="round",
                train_label="site train loss (mean)", select_by=s_by(s))  # fmt: skip
    if test.confusion:
        plot_confusion(test, labels, run_dir / "confusion.png", f"test, {title}")
    write_answers(run_dir, test)
    early = " (stopped early)" if s["stopped_early"] else ""
    facts = [
        ("method", f"`{s['method']}`"),
        ("base model", f"`{s['model']}` ({s['kind']})"),
        ("data", s["data"]),
        ("sites", ", ".join(s["sites"])),
        ("examples train (all sites) / shared validation / test",
         f"{s['n_train']} / {s['n_validation']} / {s['n_test']}"),
        ("trainable parameters", f"{s['trainable_parameters']:,} "
         f"({s['trainable_percent']:.3f}% of {s['base_parameters']:,})"),
        ("strategy / transport", f"{s['strategy']} / {s['transport']}"),
        ("rounds (best)", f"{s['rounds']}{early} ({s['best_round']})"),
        *_kept(s, "round", loss_line=False),
        ("bytes per site per round, down / up",
         f"{_mb(s['bytes_down_per_site_round'])} / {_mb(s['bytes_up_per_site_round'])}"),
        ("bytes in total", _mb(s["bytes_total"])),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
    ]  # fmt: skip
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts)
    key, name = _val_metric([r for r in history if r["round"] > 0 and "val_loss" in r], s_by(s))
    acc = bool(key)  # generation: loss only
    per_round = ["| round | sites | train loss | val loss | " + (f"val {name} | " if acc else "")
                 + "down | up | s |", "|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
    for r in history:
        if r["round"] == 0:
            continue
        per_round.append(
            f"| {r['round']} | {r.get('sites', '')}/{r.get('sampled', '')} "
            f"| {r.get('train_loss', float('nan')):.4f} | {r.get('val_loss', float('nan')):.4f} "
            + (f"| {_pct(r.get(key, float('nan')))} " if acc else "")
            + f"| {_mb(r.get('bytes_down', 0))} "
            f"| {_mb(r.get('bytes_up', 0))} | {r.get('seconds', 0):.1f} |"
            + (" abandoned" if r.get("abandoned") else "")
        )
    text = f"""# Run {s["name"]}: {title}

| | |
|---|---|
{rows}

The global model is the round with {"the lowest shared validation loss" if s_by(s) == "loss"
else f"the highest shared validation {LABEL.get(s_by(s), s_by(s))}"}.

## Test set (global model)

{test_section(test, labels)}

![rounds](rounds.png)
{chr(10) + "![confusion matrix](confusion.png)" + chr(10) if test.confusion else ""}
## Rounds

{chr(10).join(per_round)}
"""
    if s.get("dropped"):
        lines = ["## Sites that dropped out", "",
                 "A round goes on with the sites that replied (at least federated.min_sites).",
                 "", "| round | phase | site | when (UTC) | reason |",
                 "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {d['round']} | {d.get('phase', 'train')} | {d['site']} | {d['at']} | "
                  f"{table_cell(d['reason'])} |" for d in s["dropped"]]  # fmt: skip
        text += "\n" + "\n".join(lines) + "\n"
    text += defences_section(s)
    if s.get("personalized"):
        text += "\n" + personalized_table(s["personalized"]) + "\n"
    if s.get("notes"):
        text += "\n## Data notes\n\n" + "\n".join(f"- {n}" for n in s["notes"]) + "\n"
    (run_dir / "report.md").write_text(text)


def personalized_table(rows: list[dict[str, Any]]) -> str:
    """Each site's validation metric (the task's primary one) and loss, global model
    versus the site's personalized one."""
    ok = [r for r in rows if "error" not in r]
    names = {"accuracy": "accuracy", "rougeL": "ROUGE-L", "pair_accuracy": "pair accuracy"}
    key = next((k for k in names if ok and f"global_val_{k}" in ok[0]), "")
    name = names.get(key, "")
    head = f"| global {name} | personalized {name} " if key else ""
    lines = ["## Global and personalized models (each site's own validation set)", "",
             f"| site {head}| global loss | personalized loss |",
             "|---|---|---|" + ("---|---|" if key else "")]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['site']} | failed: {r['error']} | |" + (" | |" if key else ""))
            continue
        metric = (f"| {_pct(r[f'global_val_{key}'])} | {_pct(r[f'personal_val_{key}'])} "
                  if key else "")  # fmt: skip
        lines.append(f"| {r['site']} {metric}| {r['global_val_loss']:.4f} "
                     f"| {r['personal_val_loss']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def defences_section(s: dict[str, Any]) -> str:
    """What defended the aggregate, what it rejected or clipped, the privacy spent."""
    d = s.get("defences") or {}
    if not d:
        return ""
    norm = (f"L2 norm of an update bounded at {d['update_norm']:g} ({d['update_norm_action']})"
            if d.get("update_norm") else "no norm bound")  # fmt: skip
    tolerates = f" (tolerates {d['malicious']} malicious sites)" if "malicious" in d else ""
    lines = ["", "## Defences", "",
             f"- update validation (always on): {d['validation']}; {norm}",
             f"- aggregation: `{d['strategy']}`{tolerates}"]  # fmt: skip
    if d.get("secagg"):
        lines.append("- **secure aggregation (SecAgg+)**: the server saw only the sum of the "
                     "sites' states; their updates could not be validated one by one")
    if s.get("clipped"):
        lines.append(f"- updates clipped to the norm bound: {s['clipped']}")
    if d.get("attack", "none") != "none":
        lines.append(f"- **simulated attack**: the first {d['attackers']} site(s) sent "
                     f"`{d['attack']}` updates (scale {d['attack_scale']:g})")  # fmt: skip
    p = s.get("privacy")
    if p:
        target = f" (target {p['target_epsilon']:g})" if p.get("target_epsilon") else ""
        lines += ["", "## Differential privacy", "",
                  f"Client-level DP, {p['clipping']}-side clipping of each update to "
                  f"{p['clip']:g}, Gaussian noise multiplier {p['noise_multiplier']:.4g}: "
                  f"**epsilon {p['epsilon']:.3g}**{target} at delta {p['delta']:g} after "
                  f"{s['rounds']} rounds ({p['accounting']})."]  # fmt: skip
    else:
        lines.append("- differential privacy: off (no privacy guarantee)")
    if s.get("rejected"):
        lines += ["", "## Updates rejected", "",
                  "A rejected update leaves its site out of that round's aggregate.", "",
                  "| round | site | reason |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['round']} | {r['site']} | {table_cell(r['reason'])} |"
                  for r in s["rejected"]]  # fmt: skip
    return "\n".join(lines) + "\n"
