"""Trainer callbacks: ``train(config, callbacks=[...])`` calls them at fixed points of the run.

A callback is any object with some of these methods (each optional; the
argument is the :class:`~linf_plugin.training.TrainResult` so far: its
``history`` holds one record per finished epoch, ``checkpoint_path`` the
last checkpoint written)::

    class EpochPrinter:
        def on_train_start(self, result):   # after a resume: result.history holds the epochs already done
            ...
        def on_epoch_end(self, result):     # after the epoch's log record and checkpoint are written
            print(result.history[-1]["epoch"], result.history[-1]["train_loss"])
        def on_train_end(self, result):     # the final result, after final.json is written
            ...

Under ``torchrun`` every rank calls its callbacks (rank 0 writes the files);
``result.history`` is the same on every rank.  A callback that raises stops
the run; the last checkpoint stays on disk, and ``resume`` continues from it.
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

__all__ = ["Callback", "HOOKS", "check_callbacks", "call_hook"]

#: The hooks a callback may define, in the order a run calls them.
HOOKS = ("on_train_start", "on_epoch_end", "on_train_end")


@runtime_checkable
class Callback(Protocol):
    """The protocol of a trainer callback; every hook is optional (define the ones you need)."""

    def on_epoch_end(self, result) -> None:
        """Called after each epoch, once its log record and checkpoint are written."""


def check_callbacks(callbacks: Iterable) -> Sequence:
    """``callbacks`` as a tuple, each checked to define at least one hook of :data:`HOOKS`.

    Raises:
        TypeError: a single callback passed where a sequence is expected, or an object with no hook.
    """
    if callbacks is None:
        return ()
    if any(hasattr(callbacks, h) for h in HOOKS):
        raise TypeError("callbacks must be a sequence of callbacks, e.g. callbacks=[my_callback]")
    out = tuple(callbacks)
    for cb in out:
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise TypeError(f"{cb!r} is no trainer callback: it defines none of {list(HOOKS)}")
    return out


def call_hook(callbacks: Sequence, hook: str, result) -> None:
    """Call ``hook(result)`` on every callback that defines it, in order."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(result)
