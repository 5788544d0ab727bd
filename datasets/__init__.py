"""Data-set readers and the embedded synthetic data of Veracity.

Installed as ``veracity_datasets`` (never as a top-level ``datasets``, which
is the Hugging Face library's name): ``import veracity_datasets``.
"""
