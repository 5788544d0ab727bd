"""The streaming VO: frames one by one, a sliding keyframe window, pluggable correspondence sources.

* :mod:`.runner` -- :class:`StreamingVO` and :func:`run_sequence`;
* :mod:`.settings` -- ``StreamingConfig``;
* :mod:`.window`, :mod:`.keyframes`, :mod:`.pose_history` -- the window, keyframe removal, every frame's pose;
* :mod:`.sources` (learned), :mod:`.oracle` (ground truth) -- where BA targets and weights come from;
* :mod:`.lookup` -- the correlation lookup on the window's slot buffers;
* :mod:`.profiling` -- stage timers and memory.
"""
