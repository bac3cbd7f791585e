"""Sweeps: grids of ``score`` or ``transfer`` cells, each an ordinary run directory.

* :mod:`asbound.sweep.grid`: the cells of a shift / eps / resize sweep or a TOML grid file;
* :mod:`asbound.sweep.engine`: running them (local, submitit's local executor, Slurm), reusing
  the cells already done, recording ``OUT/sweep.json``.
"""

from asbound.sweep.engine import EXECUTORS, SlurmOptions, SweepResult, run_cell, run_sweep
from asbound.sweep.grid import KINDS, Cell, Sweep, eps_sweep, grid_sweep, product_sweep, resize_sweep, shift_sweep

__all__ = ["EXECUTORS", "KINDS", "Cell", "SlurmOptions", "Sweep", "SweepResult", "eps_sweep", "grid_sweep",
           "product_sweep", "resize_sweep", "run_cell", "run_sweep", "shift_sweep"]
