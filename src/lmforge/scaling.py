"""The last stage of a scaling sweep: fit L(N, D) = E + A / N^alpha + B / D^beta to the pretraining runs.

Reads each pretrain stage's manifest: N, its parameters outside the embeddings; D, the tokens it trained
on; L, its final validation loss. For fixed exponents the law is linear in (E, A, B), so the fit is a
least-squares solve for every (alpha, beta) on a grid, keeping the best one with E, A, B >= 0. With few
points the exponents are loosely determined: fit.json says how far they move when one point is left out.

Outputs: fit.json (the law, its fitted constants, RMSE, leave-one-out ranges, every point with its
prediction), loss_vs_compute.png (loss against compute C = 6ND, with the fitted curve of each model size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge import stage
from lmforge.schema import StageConfig

EXPONENTS = np.linspace(0.02, 1.5, 149)  # the grid of alpha and beta


def fit(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict:
    """The least-squares L(N, D) over the exponent grid; N and D are scaled by their geometric means
    so that the design matrix stays well conditioned whatever the exponent."""
    n0, d0 = np.exp(np.log(n).mean()), np.exp(np.log(d).mean())
    alpha, beta = np.meshgrid(EXPONENTS, EXPONENTS, indexing="ij")
    x = (n / n0)[None, None, :] ** -alpha[..., None]
    y = (d / d0)[None, None, :] ** -beta[..., None]
    design = np.stack([np.ones_like(x), x, y], axis=-1)  # (alphas, betas, points, 3)
    coefs = np.linalg.pinv(design) @ loss  # (alphas, betas, 3): E, A, B for each pair of exponents
    sse = ((design @ coefs[..., None])[..., 0] - loss) ** 2
    sse = sse.sum(-1)
    physical = (coefs >= 0).all(-1)
    if physical.any():
        sse = np.where(physical, sse, np.inf)
    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    e, a, b = coefs[i, j]
    return {
        "E": float(e),
        "A": float(a * n0 ** alpha[i, j]),
        "alpha": float(alpha[i, j]),
        "B": float(b * d0 ** beta[i, j]),
        "beta": float(beta[i, j]),
        "rmse": float(np.sqrt(sse[i, j] / len(loss))),
    }


def predict(law: dict, n, d):
    return law["E"] + law["A"] / np.asarray(n, float) ** law["alpha"] + law["B"] / np.asarray(d, float) ** law["beta"]


def plot(points: list[dict], law: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    d_all = np.array([p["D"] for p in points], float)
    d_line = np.geomspace(d_all.min() / 2, d_all.max() * 2, 100)
    for color, n in enumerate(sorted({p["N"] for p in points})):
        mine = [p for p in points if p["N"] == n]
        ax.scatter([6 * n * p["D"] for p in mine], [p["loss"] for p in mine], color=f"C{color}", label=f"N = {n:,}")
        ax.plot(6 * n * d_line, predict(law, n, d_line), color=f"C{color}", alpha=0.6)
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="final validation loss (nats/token)")
    ax.set_title(
        f"L = {law['E']:.2f} + {law['A']:.3g}/N^{law['alpha']:.2f} + {law['B']:.3g}/D^{law['beta']:.2f}"
        f"   (RMSE {law['rmse']:.3f}, {len(points)} runs)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    points = []
    for name, directory in sorted(cfg.inputs.items()):
        metrics = stage.metrics(directory)
        n, d, loss = metrics["non_embedding_parameters"], metrics["train_tokens_seen"], metrics["validation_loss"]
        points.append({"pretrain": name.removeprefix("pretrain_"), "N": n, "D": d, "loss": loss})
    n, d, loss = (np.array([p[k] for p in points], float) for k in ("N", "D", "loss"))
    law = fit(n, d, loss)
    for point, predicted in zip(points, predict(law, n, d)):
        point["predicted"] = float(predicted)
    # How stable the exponents are: their range over the fits that leave one run out.
    held_out = [fit(np.delete(n, i), np.delete(d, i), np.delete(loss, i)) for i in range(len(points))]
    leave_one_out = {k: [min(f[k] for f in held_out), max(f[k] for f in held_out)] for k in ("alpha", "beta")}
    result = {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "N": "non-embedding parameters",
        "D": "training tokens",
        "L": "final validation loss (nats/token)",
        **law,
        "runs": len(points),
        "leave_one_out": leave_one_out,
        "points": points,
    }
    stage.write_json(out / "fit.json", result)
    plot(points, law, out / "loss_vs_compute.png")
    tracker.log_artifacts([out / "fit.json", out / "loss_vs_compute.png"])
    return {**law, "runs": len(points)}


if __name__ == "__main__":
    stage.run(main)
