"""The engine's profiling hook: named stages and parts a caller may time (default: nothing, no cost).

``FaceEngine.process(images, timer=...)`` and ``MTCNN.detect(..., timer=...)`` enter ``timer.stage(name)``
around each stage (upload, pnet, rnet, onet, align, embed, to_host) and ``timer.part(name)`` around the
parts inside a detector stage (resize, net, crops, nms). A benchmark passes an object with these two
methods returning context managers (which may synchronise CUDA and read clocks); everyone else gets
:data:`NO_TIMER`, whose context managers do nothing.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

STAGES = ("upload", "pnet", "rnet", "onet", "align", "embed", "to_host")
PARTS = ("resize", "net", "crops", "nms")


class StageTimer(Protocol):
    """What the engine calls; ``stage`` names one of :data:`STAGES`, ``part`` one of :data:`PARTS`."""

    def stage(self, name: str) -> ContextManager[None]: ...

    def part(self, name: str) -> ContextManager[None]: ...


class _NoTimer:
    _null = contextlib.nullcontext()   # reusable: entering it does nothing

    def stage(self, name: str) -> ContextManager[None]:
        return self._null

    def part(self, name: str) -> ContextManager[None]:
        return self._null


NO_TIMER: StageTimer = _NoTimer()
