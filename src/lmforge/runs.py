"""A table of a sweep's configurations: the params that differ between them and their headline metrics.

    lmforge runs                                   # the default experiment
    lmforge runs train.lr=1e-4,3e-4,1e-3           # the sweep that these overrides ran
    lmforge runs run.sweep=lr --sort finetune_test_bpb
    lmforge runs run.sweep=lr --csv > lr.csv

Reads the central MLflow store (filled by the `history` rule); overrides are the
same Hydra overrides the pipeline ran with, sweeps included, to find the store and the sweep.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys

from lmforge import history, tracking


def load_configurations(uri: str, experiment_name: str) -> list[dict]:
    """One dict per configuration (a parent run): run_key, run ids, status, params and summary metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no experiment '{experiment_name}' in {uri} (has the `history` rule run?)")
    condition = " and ".join(f"tags.`{k}` = '{v}'" for k, v in history.CONFIGURATION_ROLE.items())
    parents = client.search_runs([experiment.experiment_id], filter_string=condition, max_results=10000)
    return [
        {
            "run_key": run.data.tags[history.RUN_KEY_TAG],
            "run_id": run.info.run_id,
            "status": run.info.status,  # RUNNING while lmforge.watch follows it, FINISHED once merged whole
            "experiment_id": experiment.experiment_id,
            "params": run.data.params,
            "metrics": run.data.metrics,
        }
        for run in parents
    ]


def swept_params(configurations: list[dict]) -> list[str]:
    """Params whose value is not the same in every configuration (what the sweep varied)."""
    names = sorted({name for c in configurations for name in c["params"]})
    return [name for name in names if len({c["params"].get(name) for c in configurations}) > 1]


def as_number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def table(configurations: list[dict]) -> tuple[list, list]:
    """Header and rows: run_key, status, the swept params, then the summary metrics any configuration has."""
    params = swept_params(configurations)
    metrics = [m for m in history.SUMMARY_METRICS if any(m in c["metrics"] for c in configurations)]
    header = ["run_key", "status", *params, *metrics]
    rows = [
        [c["run_key"], c["status"], *(c["params"].get(p) for p in params), *(c["metrics"].get(m) for m in metrics)]
        for c in configurations
    ]
    return header, rows


def sort_rows(rows: list, column: int, descending: bool = False) -> list:
    """By value, numerically when every value is a number; rows missing the value go last."""
    present = [row for row in rows if row[column] is not None]
    missing = [row for row in rows if row[column] is None]
    numeric = all(as_number(row[column]) is not None for row in present)
    present.sort(key=lambda row: as_number(row[column]) if numeric else str(row[column]), reverse=descending)
    return present + missing


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_csv(file, header: list, rows: list) -> None:
    writer = csv.writer(file)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])


def format_text(header: list, rows: list) -> str:
    cells = [header, *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. run.sweep=lr")
    parser.add_argument("--sort", metavar="COLUMN", help="sort by this column (a param or a metric)")
    parser.add_argument("--descending", action="store_true", help="largest first")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout instead of a text table")


def main(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from lmforge import config, sweep

    try:
        _, configurations = sweep.expand(args.overrides)  # a sweep's id, as the pipeline named its experiment
        run_cfg = OmegaConf.to_container(config.load(configurations[0]).run, resolve=True)
    except config.ConfigError as err:
        print(f"lmforge runs: config error: {err}", file=sys.stderr)
        return 2
    try:
        configurations = load_configurations(tracking.tracking_uri(run_cfg), tracking.experiment_name(run_cfg))
    except LookupError as err:
        print(f"lmforge runs: {err}", file=sys.stderr)
        return 1
    header, rows = table(configurations)
    if args.sort and args.sort not in header:
        print(f"lmforge runs: no column '{args.sort}'. Columns: {', '.join(header)}", file=sys.stderr)
        return 2
    rows = sort_rows(rows, header.index(args.sort or "run_key"), args.descending)
    if args.csv:
        write_csv(sys.stdout, header, rows)
    else:
        print(f"{tracking.experiment_name(run_cfg)}: {len(rows)} configuration{'' if len(rows) == 1 else 's'}")
        if rows:
            print(format_text(header, rows))
    return 0
