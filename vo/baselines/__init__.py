"""Reference methods no network produced: a classical monocular VO (OpenCV + numpy).

* :mod:`.classical` -- :class:`~.classical.ClassicalVO`, the pipeline frame by frame (tracking,
  initialisation, PnP, keyframes, windowed bundle adjustment), and :class:`~.classical.InitialisationError`;
* :mod:`.settings` -- :class:`~.settings.ClassicalVOConfig`, its tunables;
* :mod:`.tracking` -- corners, pyramidal Lucas-Kanade with the forward-backward check, the tracks;
* :mod:`.two_view` -- essential matrix, pure rotation, triangulation, parallax;
* :mod:`.pnp` -- a frame's pose from the map points it sees;
* :mod:`.local_ba` -- the numpy windowed bundle adjustment (Levenberg-Marquardt, Schur complement, Huber).
"""
