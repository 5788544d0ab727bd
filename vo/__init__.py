"""Veracity's visual-odometry model, losses, training utilities and runners.

``vo`` builds on :mod:`ba_layer`; it never imports the data-set readers
(``veracity_datasets``), which ``train.py`` and ``evaluate.py`` wire in.
"""
