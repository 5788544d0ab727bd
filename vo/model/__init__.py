"""The network: encoders, patch selection, the patch graph, correlation, the update operator, the BA alternation.

* :mod:`.network` -- :class:`VONet`, its ``ModelConfig`` and ``BAConfig``;
* :mod:`.encoders` -- matching and context encoders (1/4 resolution);
* :mod:`.patches` -- patch centres, feature gathering, patch pixel grids;
* :mod:`.graph` -- which patch is matched against which frame;
* :mod:`.correlation` -- correlation lookup around reprojections;
* :mod:`.update`, :mod:`.blocks` -- the recurrent update operator and its parts.
"""
