"""Run directories: `runs/<name>/` with the resolved config, `metrics.jsonl`, the
saved model, the label map and a report.

A run is written into a hidden staging folder next to its final place and
renamed into place only when it finished; a failed or interrupted run removes
its staging folder, so no half-written run directory is ever left behind. The one
exception is a comparison (`fedtune compare`, hours of runs): interrupted or failed,
it keeps its hidden staging folder for `fedtune compare --resume`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.atomic import write_json_atomic
from fedtune.config import RunConfig
from fedtune.errors import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "labels.json"
REPORT_FILE = "report.md"
MODEL_DIR = "model"
PLAN_FILE = "compare.json"
"""What a comparison was asked to do, written first into its staging folder:
`fedtune compare --resume` reads it back."""
COMPARISON_FILE = "comparison.json"
"""A finished comparison's rows: one run summary per (method, regime, site), without
the bulky fields (`comparison_rows`)."""


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.method_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def final_run_dir(cfg: RunConfig, name: str | None = None) -> Path:
    """Where the run will live; refuses a name that is already taken."""
    out = Path(cfg.output_dir) / (name or cfg.name or default_run_name(cfg))
    if out.exists():
        raise ConfigError(
            f"run directory {out} already exists; choose another `name` "
            "(--name / --set name=...) or remove it"
        )
    return out


def staging_dir(final: Path) -> Path:
    """The hidden folder a run is written to before it is renamed to `final`."""
    return final.parent / f".{final.name}.partial"


def final_of_staging(path: Path) -> Path | None:
    """The folder a staging folder (`.<name>.partial`) becomes when its run finishes;
    None for any other path."""
    if path.name.startswith(".") and path.name.endswith(".partial"):
        return path.parent / path.name[1 : -len(".partial")]
    return None


@contextmanager
def staged_run_dir(final: Path, *, resumable: bool = False, resume: bool = False
                   ) -> Iterator[Path]:  # fmt: skip
    """Yield a staging folder; rename it to `final` on success, delete it on error.

    `resumable` (comparisons, which run for hours): a run that is interrupted or
    fails keeps its staging folder, with the runs it finished, for `resume`, which
    continues in that folder. A leftover staging folder is removed before a new run
    starts, unless it holds an interrupted comparison."""
    staging = staging_dir(final)
    if resume:
        if not staging.is_dir():
            raise ConfigError(f"no interrupted run at {final} (no {staging})")
    else:
        if (staging / PLAN_FILE).is_file():
            raise ConfigError(
                f"{staging} holds an interrupted comparison named {final.name!r}: continue it "
                f"with `fedtune compare --resume {final}`, remove that folder, or choose "
                "another name (--set name=...)"
            )
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists():
            raise ConfigError(f"run directory {final} appeared while this run was going on")
        staging.rename(final)
    except BaseException:
        if not (resumable or resume):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """All or nothing (fedtune.atomic), NaN written as null."""
    write_json_atomic(path, _clean(data))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(_clean(record), sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_model_dir(path: str | Path) -> Path:
    """A run directory or its model folder -> the model folder."""
    p = Path(path)
    if (p / MODEL_DIR / "fedtune.json").is_file():
        return p / MODEL_DIR
    if (p / "fedtune.json").is_file():
        return p
    raise ConfigError(
        f"{p} is not a fedtune run directory (no {MODEL_DIR}/fedtune.json); "
        "pass a folder made by `fedtune train` or `fedtune run`"
    )
