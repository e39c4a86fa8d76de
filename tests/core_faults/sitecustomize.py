"""Fault injection for engine-core processes started by the tests.

A Python started with this folder on ``PYTHONPATH`` imports this module at start-up. When one of
the variables below is set, ``EngineCore.step`` is wrapped, so tests can slow, hold or break the
step loop of a core that runs in another process:

- ``OCTAVO_TEST_STEP_DELAY_S``: sleep this long in every step, once it is scheduled;
- ``OCTAVO_TEST_HOLD_FILE``: in every step, once it is scheduled, wait while this file exists;
- ``OCTAVO_TEST_FAIL_STEP``: raise ``RuntimeError`` in this step (1 = the first).
"""

import os
import time

_DELAY = float(os.environ.get("OCTAVO_TEST_STEP_DELAY_S", "0") or 0)
_HOLD = os.environ.get("OCTAVO_TEST_HOLD_FILE")
_FAIL = int(os.environ.get("OCTAVO_TEST_FAIL_STEP", "0") or 0)

if _DELAY or _HOLD or _FAIL:
    from octavo.engine.core import EngineCore
    from octavo.worker.model_runner import ModelRunner

    _step, _launch = EngineCore.step, ModelRunner.launch
    _count = [0]

    def _faulty_step(self, *args, **kwargs):
        _count[0] += 1
        if _count[0] == _FAIL:
            raise RuntimeError("simulated device failure")
        return _step(self, *args, **kwargs)

    def _slow_launch(self, *args, **kwargs):  # the batch is chosen: the core is "busy" in its step
        if _DELAY:
            time.sleep(_DELAY)
        while _HOLD and os.path.exists(_HOLD):
            time.sleep(0.01)
        return _launch(self, *args, **kwargs)

    EngineCore.step = _faulty_step
    ModelRunner.launch = _slow_launch
