"""OSSCAR structured pruning: calibration statistics, the per-layer solver, baselines, the
sequential driver over a transformers model, packing into a smaller checkpoint, the
``slmserve prune`` command and the ``osscar`` backend. See docs/pruning.md.

Importing the package imports nothing heavy (the backend plugin and the CLI load at start-up);
use the modules: :mod:`~slmserve.prune.gram`, :mod:`~slmserve.prune.osscar`,
:mod:`~slmserve.prune.baselines`, :mod:`~slmserve.prune.calibration`,
:mod:`~slmserve.prune.pipeline`, :mod:`~slmserve.prune.pack`.
"""

METHODS = ("osscar", "magnitude", "magnitude-refit", "wanda")
"""Pruning methods: OSSCAR and the three baselines (see :mod:`slmserve.prune.baselines`)."""
