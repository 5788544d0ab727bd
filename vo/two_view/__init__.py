"""Two-view relative pose with learned outlier rejection (MinBackProp's application, arXiv 2404.17993).

* :mod:`.matches` -- putative matches (SIFT / ORB with the ratio test, or KLT) and the per-match features;
* :mod:`.network` -- :class:`~.network.InlierNet`, a CNe-style PointNet with context normalisation: one
  inlier weight per match;
* :mod:`.pose` -- weights -> weighted eight-point -> essential matrix -> cheirality, differentiable with
  ``backward: ift | ddn | autograd``; guided RANSAC at test time;
* :mod:`.losses` -- rotation geodesic and translation-direction errors, the Sampson-distance auxiliary term;
* :mod:`.pairs` -- training pairs with exact ground truth from any sequence with poses, and their batches;
* :mod:`.train` -- the training loop (atomic checkpoints, exact resume, JSON log), and the
  inference helper :class:`~.train.TwoViewEstimator` that other code (the classical VO) loads.

``vo.two_view`` reads no data set itself: scripts (``benchmarks/train_two_view.py``,
``benchmarks/two_view_bench.py``) open the sequences and hand them in.
"""
