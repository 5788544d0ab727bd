"""Gradient-variance instrumentation: statistics, the three-cause probes, the offline report and its plots.

* :mod:`.gradstats` -- running per-parameter gradient statistics (SNR) over steps and ranks;
* :mod:`.snr_protocol` -- V2V's gradient-SNR protocol on a saved checkpoint (200 minibatches, two heads);
* :mod:`.causes` -- the three causes of V2V measured on one minibatch;
* :mod:`.dashboards` -- the training-time instrumentation as TensorBoard dashboards;
* :mod:`.report` and :mod:`.plots` -- ``diagnose.py``'s offline report.
"""
