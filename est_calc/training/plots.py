"""Learning-curve plot (PNG) from the training history."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_learning_curves"]


def plot_learning_curves(history: list[dict], path: str | Path) -> None:
    """Training loss and validation energy / force MAE against the step, on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_energy_mae" in h]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    if train:
        axes[0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    if val:
        steps = [h["step"] for h in val]
        key_e = "val_energy_per_atom_mae" if "val_energy_per_atom_mae" in val[-1] else "val_energy_mae"
        axes[1].plot(steps, [h[key_e] for h in val], "o-")
        axes[2].plot(steps, [h.get("val_forces_mae", float("nan")) for h in val], "o-")
    axes[1].set(title="validation energy MAE" + (" per atom (eV)" if val and "per_atom" in key_e else " (eV)"),
                xlabel="step", yscale="log")
    axes[2].set(title="validation force MAE (eV/Å)", xlabel="step", yscale="log")
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
