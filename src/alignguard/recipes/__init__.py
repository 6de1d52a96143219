"""Recipes: one module per command (`fisher`, `train`, `align`, `compare`, `demo`, `scaling`, `eval`).

Recipes decide where files go, which data is used by default and how a stage resumes; they compose the
components (`alignguard.fisher`, `subspace`, `regularizers`, `projection`, `driftcheck`) and the trainer.
Components never import recipes.
"""
