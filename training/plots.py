"""Figures for a run folder: loss curves, reconstruction grid and a 2-D view of the codes.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot, no global state, no
display): saving goes through the Agg canvas, so this works on headless machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA


def plot_loss_curves(history: dict[str, dict], path: Path) -> None:
    """One panel per stage: training and validation loss per epoch."""
    stages = [(name, record) for name, record in history.items() if record["train_loss"]]
    fig = Figure(figsize=(4 * max(len(stages), 1), 3.2), layout="constrained")
    for i, (name, record) in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), i + 1)
        epochs = np.arange(1, len(record["train_loss"]) + 1)
        ax.plot(epochs, record["train_loss"], label="train")
        ax.plot(epochs, record["val_loss"], label="validation")
        if "best_epoch" in record:
            ax.axvline(record["best_epoch"], color="grey", linestyle=":", label="best")
        ax.set(title=name, xlabel="epoch", ylabel="loss per example")
        ax.legend()
    fig.savefig(path, dpi=100)


def _as_image(x: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> what imshow wants: (H, W) for grey, (H, W, C) for colour."""
    return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))


def plot_reconstructions(rows: dict[str, np.ndarray], path: Path) -> None:
    """A grid with one row per entry of `rows` (e.g. clean, corrupted, reconstructed).

    Each value is (N, C, H, W) in [0, 1]; values are clipped for display.
    """
    n = len(next(iter(rows.values())))
    fig = Figure(figsize=(0.9 * n, 1.0 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(_as_image(np.clip(images[c], 0.0, 1.0)), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.savefig(path, dpi=100)


def plot_latent_2d(codes: np.ndarray, labels: np.ndarray | None, path: Path) -> None:
    """Codes (N, D) projected to their first two principal components, coloured by label."""
    if codes.shape[1] > 2:
        points = PCA(n_components=2, random_state=0).fit_transform(codes)
    else:  # already at most 2-D: a 1-D code is drawn on a line
        points = np.pad(codes, ((0, 0), (0, 2 - codes.shape[1])))
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6)
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set(title="codes, first two principal components", xlabel="PC 1", ylabel="PC 2")
    fig.savefig(path, dpi=100)
