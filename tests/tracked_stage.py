"""Stage runs recorded through lmforge.tracking as a stage's job records them, with made-up metrics instead of training.

`python -m tests.tracked_stage record ROOT INDEX` is one of many concurrent jobs: it records the pretrain stage of
configuration INDEX with WRITER_STEPS step metrics. `python -m tests.tracked_stage merge ROOT INDEX...` merges those
configurations into the central store, as the `history` rule does for each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from lmforge import history, tracking

WRITER_STEPS = 100


def run_config(root: Path, run_key: str, sweep: str | None = "demo") -> dict:
    return {
        "results_dir": str(root),
        "experiment": "lmforge",
        "sweep": sweep,
        "mlflow_uri": None,
        "wandb": False,
        "run_key": run_key,
    }


def record_stage(
    root: Path, stage: str, key: str, run_cfg: dict, sections: dict, inputs=None, curves=None, summary=None
) -> Path:
    """A finished stage directory with config.yaml, manifest.json and its run record."""
    stage_dir = root / stage / key
    cfg = {
        "stage": stage,
        "key": key,
        **sections,
        "inputs": {n: str(p) for n, p in (inputs or {}).items()},
        "run": run_cfg,
    }
    with tracking.stage_run(cfg, stage_dir) as tracker:
        for metric, values in (curves or {}).items():
            for step, value in enumerate(values, start=1):
                tracker.log_metrics({metric: value}, step=step)
        tracker.log_metrics(summary or {})
        (stage_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        (stage_dir / "manifest.json").write_text(
            json.dumps({"stage": stage, "config": cfg, "tracking_run_id": tracker.run_id})
        )
        tracker.log_artifacts([stage_dir / "config.yaml", stage_dir / "manifest.json"])
    return stage_dir


def writer_loss(index: int, step: int) -> float:
    return 10.0 / (step + index)


def writer_stage(root: Path, index: int) -> tuple[dict, Path]:
    return run_config(root, f"config{index:02d}", sweep="writers"), root / "pretrain" / f"pretrain{index:02d}"


if __name__ == "__main__":
    command, root, indices = sys.argv[1], Path(sys.argv[2]), [int(i) for i in sys.argv[3:]]
    for index in indices:
        run_cfg, stage_dir = writer_stage(root, index)
        if command == "record":
            losses = [writer_loss(index, step) for step in range(1, WRITER_STEPS + 1)]
            train = {"train": {"lr": index / 1000}}
            record_stage(root, "pretrain", stage_dir.name, run_cfg, train, curves={"train_loss": losses})
        else:
            history.merge({"pretrain": stage_dir}, run_cfg)
