"""Training support for est_calc: data readers, and later losses, loops and metrics.

Subpackages:

* :mod:`est_calc.training.datasets` - readers and writers for OC20-style data (S2EF extxyz with
  the ``.txt`` sidecar, ASE databases including ASE-LMDB, legacy OC20 LMDBs of pickled
  torch_geometric objects read through a restricted unpickler, and a packed HDF5 format), all
  returning :class:`est_calc.training.datasets.Frame` records.

The training code imports the model core (``est_calc``); the model core never imports
``est_calc.training``. This module imports nothing heavy on purpose.
"""
