"""Evaluation: evo metrics, trajectory files, plots, loading a trained model.

* :mod:`.metrics` -- ATE/RPE through evo;
* :mod:`.tum_files` -- trajectory files in TUM format;
* :mod:`.plots` -- trajectory plots;
* :mod:`.trained_model` -- a checkpoint as a network plus streaming settings.
"""
