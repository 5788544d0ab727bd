"""Evaluation: running methods on sequences, evo metrics, trajectory files, plots, results, a trained model.

* :mod:`.evaluation` -- the loop ``evaluate.py`` runs: every method on every sequence, failures as rows,
  results written after each sequence;
* :mod:`.methods` -- the methods compared (the learned streaming VO, the classical baseline) as callables;
* :mod:`.results` -- ``results.md`` / ``results.json`` and what a failure row holds;
* :mod:`.metrics` -- ATE/RPE through evo;
* :mod:`.tum_files` -- trajectory files in TUM format;
* :mod:`.plots` -- trajectory plots;
* :mod:`.trained_model` -- a checkpoint as a network plus streaming settings.
"""
