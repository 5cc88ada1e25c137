"""Plots of MD results (matplotlib Agg canvas: files only, no display needed)."""

from __future__ import annotations

import os

from md_recipes.safety import atomic_output

__all__ = ["plot_md"]


def plot_md(result, path: str) -> str:
    """Write a PNG of energies and temperature (and pressure when known) vs time.

    The file is written whole (temporary file, then rename; see
    :func:`md_recipes.safety.atomic_output`); its format follows the extension (PNG if none).

    Args:
        result: an :class:`md_recipes.md.MDResult`.
        path: output PNG path.

    Returns:
        The path written.
    """
    # The Agg canvas is attached to this figure only: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_panels = 3 if result.pressure is not None else 2
    fig = Figure(figsize=(6.4, 2.4 * n_panels))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, sharex=True)
    t_ps = result.time_fs / 1000.0
    ax = axes[0]
    ax.plot(t_ps, result.epot - result.epot[0], label="E_pot - E_pot(0)")
    ax.plot(t_ps, result.ekin - result.ekin[0], label="E_kin - E_kin(0)")
    ax.plot(t_ps, result.etot - result.etot[0], label="E_tot - E_tot(0)", color="k")
    ax.set_ylabel("energy (eV)")
    ax.legend(fontsize="small")
    axes[1].plot(t_ps, result.temperature, color="tab:red")
    axes[1].set_ylabel("T (K)")
    if result.pressure is not None:
        axes[2].plot(t_ps, result.pressure, color="tab:green")
        axes[2].set_ylabel("P (GPa)")
    axes[-1].set_xlabel("time (ps)")
    fig.tight_layout()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format=fmt)
    return path
