"""When the checks that read tensor values back to the host run.

A check of a shape, a dtype or a device costs nothing and always runs.  A check
of *values* (indices in range, inputs finite, focal lengths positive) must read
them on the host: on a GPU each such read is a synchronisation that stalls the
queue of kernels, and a training step made about thirty of them per update
(issue 13).  The value checks of :mod:`ba_layer` therefore run:

* on the CPU by default (a read there waits for nothing: there is no queue);
* on any other device (CUDA) only when asked: ``VERACITY_DEBUG_CHECKS=1`` in the
  environment, or inside ``with checking(True):``;
* nowhere with ``VERACITY_DEBUG_CHECKS=0`` or inside ``with checking(False):``
  (the CPU included: the tests count host reads this way).

With the checks off a bad value is not refused at the door: an index out of
range still raises in torch's own indexing (on CUDA as a device-side assert),
and a NaN or inf input propagates into the outputs, where the trainer's one
finiteness check per step sees it.  Turn the checks on to be told which
tensor was bad.

The same variable turns on :mod:`vo`'s debug checks (:func:`checks_enabled`,
which :mod:`vo.model.network` imports), which run only when asked on every
device.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional, Union

import torch

#: Environment variable of the debug checks: ``1`` (or any value but ``0`` and empty) on, ``0`` off everywhere,
#: unset or empty the default (value checks on the CPU only).
DEBUG_CHECKS_ENV = "VERACITY_DEBUG_CHECKS"

_forced: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("veracity_debug_checks", default=None)


def _setting() -> Optional[bool]:
    """True / False when the checks are switched on / off (context first, then the environment); None: default."""
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get(DEBUG_CHECKS_ENV, "")
    return None if value == "" else value != "0"


def checks_enabled() -> bool:
    """Whether the debug checks are switched on (``VERACITY_DEBUG_CHECKS=1`` or inside ``checking(True)``)."""
    return bool(_setting())


def value_checks(device: Union[torch.device, str]) -> bool:
    """Whether the value checks of tensors on ``device`` run: switched on, or by default on the CPU."""
    setting = _setting()
    return torch.device(device).type == "cpu" if setting is None else setting


@contextlib.contextmanager
def checking(enabled: bool) -> Iterator[None]:
    """Switch the checks on (``True``: every device) or off (``False``: the CPU too) inside the block.

    Overrides the environment variable in this thread (and its context) only.

    Example:
        >>> with checking(True):
        ...     pass   # bundle_adjust(...) on a GPU now refuses an out-of-range index by name
    """
    token = _forced.set(bool(enabled))
    try:
        yield
    finally:
        _forced.reset(token)
