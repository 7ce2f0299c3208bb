"""Comparison plots of a sweep's configurations, shown by `snakemake --report report.html`.

    python -m lmforge.report OUT_DIR HISTORY.json [HISTORY.json ...]

The HISTORY files are what the `history` rule wrote (they name the central store
and the experiment). Every configuration of that experiment is compared, also
ones merged by earlier runs: an experiment is one sweep. Writes into OUT_DIR:
- loss_curves.svg: training (solid) and validation (dashed) loss of pretraining
  and fine-tuning, one colour per configuration;
- metrics_vs_params.svg: each headline metric against each swept param;
- configurations.rst: the configurations (swept params, metrics, and the params
  they share), which the report's caption includes;
- runs.csv: the table of `lmforge runs --csv`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge import history, runs

CURVES = {"pretrain": ("train_loss", "validation_loss"), "finetune": ("train_loss", "validation_loss")}


def loss_curves(client, configuration: dict) -> dict:
    """stage -> metric -> (steps, values) of one configuration's training stages."""
    curves = {}
    for stage, metrics in CURVES.items():
        condition = f"tags.`{history.RUN_KEY_TAG}` = '{configuration['run_key']}' and tags.`lmforge.stage` = '{stage}'"
        found = client.search_runs([configuration["experiment_id"]], filter_string=condition, max_results=1)
        if not found:
            continue
        curves[stage] = {}
        for metric in metrics:
            points = sorted(client.get_metric_history(found[0].info.run_id, metric), key=lambda p: p.step)
            curves[stage][metric] = ([p.step for p in points], [p.value for p in points])
    return curves


def label(configuration: dict, swept: list[str]) -> str:
    return " ".join([configuration["run_key"], *(f"{p}={configuration['params'].get(p)}" for p in swept)])


def plot_loss_curves(client, configurations: list[dict], swept: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for index, configuration in enumerate(configurations):
        for ax, (stage, metrics) in zip(axes[0], loss_curves(client, configuration).items()):
            for metric, style in zip(CURVES[stage], ("-", "--")):
                steps, values = metrics[metric]
                name = label(configuration, swept) if metric == "train_loss" else None
                ax.plot(steps, values, style, marker=".", color=colors(index % 10), label=name)
    for ax, stage in zip(axes[0], CURVES):
        ax.set(title=f"{stage}: train (solid), validation (dashed)", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
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
            points = sorted((x, c["metrics"][metric]) for x, c in zip(xs, configurations) if metric in c["metrics"])
            ax.plot([x for x, _ in points], [y for _, y in points], "o-")
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.set(title=metric, xlabel=param)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    plot_loss_curves(MlflowClient(tracking_uri=uri), configurations, swept, out / "loss_curves.svg")
    plot_metrics_vs_params(configurations, swept, out / "metrics_vs_params.svg")
    (out / "configurations.rst").write_text(configurations_rst(experiment, configurations))
    header, rows = runs.table(configurations)
    with open(out / "runs.csv", "w", newline="") as f:
        runs.write_csv(f, header, runs.sort_rows(rows, 0))
    print(f"{len(configurations)} configurations of {experiment}, swept: {', '.join(swept) or 'nothing'}")


if __name__ == "__main__":
    main()
