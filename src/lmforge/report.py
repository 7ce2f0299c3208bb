"""Comparison plots of a sweep's configurations, shown by `snakemake --report report.html`.

    python -m lmforge.report OUT_DIR HISTORY.json [HISTORY.json ...]

The HISTORY files are what the `history` rule wrote (they name the central store
and the experiment). Every configuration of that experiment is compared, also
ones merged by earlier runs: an experiment is one sweep. Writes into OUT_DIR:
- loss_curves.svg: training (solid) and validation (dashed) loss of pretraining
  (against steps and against tokens) and fine-tuning (against steps), one colour
  per configuration, labelled with the values that differ between them;
- metrics_vs_params.svg: each headline metric against each swept param, one line
  per value of the other swept params;
- configurations.rst: the configurations (swept params, metrics, and the params
  they share), which the report's caption includes;
- runs.csv: the table of `lmforge runs --csv`.
Each plot is also written as PNG; plots, table and caption are attached to every
configuration's parent run (artifacts under `comparison/`).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from lmforge import history, runs

CURVES = {"pretrain": ("train_loss", "validation_loss"), "finetune": ("train_loss", "validation_loss")}
# The panels of loss_curves: (stage, x axis). Pretraining reads full blocks, so its tokens per step are fixed
# (train_tokens_seen / train.steps); fine-tuning's rows vary, so it is against steps only.
PANELS = (("pretrain", "step"), ("pretrain", "tokens"), ("finetune", "step"))
LOSS_UNIT = "loss (nats per token)"  # the models' cross-entropy, natural log; the card's bits per byte are test_bpb


def metric_unit(metric: str) -> str:
    """The unit of a headline metric (history.SUMMARY_METRICS), for its axis."""
    if metric.endswith("_loss"):
        return "nats per token"
    if metric.endswith("_bpb"):
        return "bits per byte"
    return "fraction of examples" if metric == "exact_match" else ""


def values_order(values: list) -> tuple:
    """Sorts configurations by their values of the swept params: numbers as numbers (32 before 128)."""
    return tuple((0, runs.as_number(v), "") if runs.as_number(v) is not None else (1, 0, str(v)) for v in values)


def loss_curves(client, configuration: dict) -> dict:
    """stage -> metric -> (steps, values) of one configuration's finished training stages, and for pretraining
    "tokens_per_step"."""
    curves = {}
    for stage, metrics in CURVES.items():
        condition = (
            f"tags.`{history.RUN_KEY_TAG}` = '{configuration['run_key']}' and tags.`lmforge.stage` = '{stage}'"
            " and attributes.status = 'FINISHED'"  # not a failed attempt kept beside it
        )
        found = client.search_runs([configuration["experiment_id"]], filter_string=condition, max_results=1)
        if not found:
            continue
        curves[stage] = {"key": found[0].data.tags.get("lmforge.stage_key", configuration["run_key"])}
        for metric in metrics:
            points = sorted(client.get_metric_history(found[0].info.run_id, metric), key=lambda p: p.step)
            curves[stage][metric] = ([p.step for p in points], [p.value for p in points])
        seen, steps = found[0].data.metrics.get("train_tokens_seen"), found[0].data.params.get("train.steps")
        if seen and steps:
            curves[stage]["tokens_per_step"] = seen / float(steps)
    return curves


def label(configuration: dict, swept: list[str]) -> str:
    """What sets a configuration apart: its values of the swept params (its run key when none differs)."""
    if not swept:
        return configuration["run_key"]
    return ", ".join(f"{p}={configuration['params'].get(p)}" for p in swept)


def stage_groups(curves: list[dict], configurations: list[dict], swept: list[str], stage: str) -> list[tuple]:
    """(label, curves) for each run of `stage`: configurations that share it (a sweep over evaluation settings
    shares one pretraining) are one line, labelled with the swept values that differ between the runs."""
    groups: dict[str, list[int]] = {}
    for index, found in enumerate(curves):
        if stage in found:
            groups.setdefault(found[stage]["key"], []).append(index)
    firsts = [configurations[members[0]] for members in groups.values()]
    differing = [p for p in swept if len({c["params"].get(p) for c in firsts}) > 1]
    labelled = []
    for members in groups.values():
        name = label(configurations[members[0]], differing) if differing else "every configuration"
        shared = f" ({len(members)} configurations)" if len(members) > 1 else ""
        labelled.append((name + shared, curves[members[0]][stage]))
    return labelled


def plot_loss_curves(client, configurations: list[dict], swept: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.5 * len(PANELS), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    configurations = sorted(configurations, key=lambda c: values_order([c["params"].get(p) for p in swept]))
    curves = [loss_curves(client, configuration) for configuration in configurations]
    for ax, (stage, axis) in zip(axes[0], PANELS):
        for index, (name, stage_curves) in enumerate(stage_groups(curves, configurations, swept, stage)):
            if axis == "tokens" and "tokens_per_step" not in stage_curves:
                continue
            scale = stage_curves["tokens_per_step"] if axis == "tokens" else 1
            for metric, style in zip(CURVES[stage], ("-", "--")):
                steps, values = stage_curves[metric]
                shown = name if metric == "train_loss" else None
                ax.plot([s * scale for s in steps], values, style, marker=".", color=colors(index % 10), label=shown)
        xlabel = "tokens trained on" if axis == "tokens" else "optimizer step"
        ax.set(title=f"{stage}: train (solid), validation (dashed)", xlabel=xlabel, ylabel=LOSS_UNIT)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, f"no finished {stage} run", transform=ax.transAxes, ha="center", color="gray")
        elif axis == "step":  # each stage's first panel: its runs differ from the other stage's
            ax.legend(fontsize=8, title=None if swept else "run key")
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path) -> None:
    """SVG for `snakemake --report`, PNG beside it for a quick look (and MLflow's artifact preview)."""
    import matplotlib.pyplot as plt

    fig.savefig(path)
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)


def plot_metrics_vs_params(configurations: list[dict], swept: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = [m for m in history.SUMMARY_METRICS if any(m in c["metrics"] for c in configurations)]
    if not swept or not metrics:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{len(configurations)} configuration(s), no param differs", ha="center", va="center")
    else:
        panels = [(param, metric) for param in swept for metric in metrics]
        columns = min(4, len(panels))
        rows = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, (param, metric) in zip(axes.flat, panels):
            values = [c["params"].get(param) for c in configurations]
            numeric = all(runs.as_number(v) is not None for v in values)
            xs = [runs.as_number(v) for v in values] if numeric else [str(v) for v in values]
            # One line per combination of the other swept params' values: joining configurations that differ
            # in those too would zig-zag between them.
            others = [p for p in swept if p != param]
            lines = defaultdict(list)  # the other params' values -> points
            for x, c in zip(xs, configurations):
                if metric in c["metrics"]:
                    lines[tuple(c["params"].get(p) for p in others)].append((x, c["metrics"][metric]))
            for rest in sorted(lines, key=values_order):
                points = sorted(lines[rest])
                name = ", ".join(f"{p}={v}" for p, v in zip(others, rest))
                ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=name or None)
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.set(title=metric, xlabel=param, ylabel=metric_unit(metric))
            ax.grid(alpha=0.3)
            if others:
                ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def configurations_rst(experiment: str, configurations: list[dict]) -> str:
    """The configurations as reStructuredText: a table of what differs, then what they share."""
    header, rows = runs.table(configurations)
    rows = runs.sort_rows(rows, 0)
    lines = [
        f"{len(rows)} configuration(s) of experiment ``{experiment}``:",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    for row in [header, *rows]:
        lines += [f"   * - {runs.cell(row[0])}", *(f"     - {runs.cell(v)}" for v in row[1:])]
    swept = set(runs.swept_params(configurations))
    shared = sorted((k, v) for k, v in configurations[0]["params"].items() if k not in swept)
    # A multi-line value (a prompt template) goes on one line: a line break would end the literal block.
    lines += [
        "",
        "Shared by all:",
        "",
        "::",
        "",
        *(f"    {k}: {v!r}" if "\n" in v else f"    {k}: {v}" for k, v in shared),
    ]
    return "\n".join([*lines, ""])


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m lmforge.report OUT_DIR HISTORY.json [HISTORY.json ...]")
    import matplotlib

    matplotlib.use("Agg")
    from mlflow.tracking import MlflowClient

    out = Path(sys.argv[1])
    merged = [json.loads(Path(path).read_text()) for path in sys.argv[2:]]
    uri, experiment = merged[0]["tracking_uri"], merged[0]["experiment"]
    if any((m["tracking_uri"], m["experiment"]) != (uri, experiment) for m in merged):
        sys.exit("lmforge.report: the configurations are in different stores or experiments")
    configurations = runs.load_configurations(uri, experiment)
    swept = runs.swept_params(configurations)
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    plot_loss_curves(client, configurations, swept, out / "loss_curves.svg")
    plot_metrics_vs_params(configurations, swept, out / "metrics_vs_params.svg")
    (out / "configurations.rst").write_text(configurations_rst(experiment, configurations))
    header, rows = runs.table(configurations)
    with open(out / "runs.csv", "w", newline="") as f:
        runs.write_csv(f, header, runs.sort_rows(rows, 0))
    with history.store_lock(uri):  # the comparison on each configuration's run, where the UI shows it
        for configuration in configurations:
            client.log_artifacts(configuration["run_id"], str(out), artifact_path="comparison")
    print(f"{len(configurations)} configurations of {experiment}, swept: {', '.join(swept) or 'nothing'}")


if __name__ == "__main__":
    main()
