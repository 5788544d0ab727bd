"""Training: the loop, losses, adaptive balancing, validation, checkpoints, run logging, distributed runtime.

* :mod:`.trainer` -- :class:`Trainer` and ``TrainConfig``;
* :mod:`.losses` -- flow, weighted (V2V) and pose losses;
* :mod:`.balancing` -- V2V's adaptive loss balancing;
* :mod:`.validation` -- validation ATE on held-out clips;
* :mod:`.checkpoint` -- atomic checkpoints, exact resume, weight export;
* :mod:`.run_logger` -- TensorBoard and the console line;
* :mod:`.distributed` -- devices, seeds, torchrun/DDP set-up.
"""
