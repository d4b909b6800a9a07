"""train.py with training steps slower than a launcher's grace period (for tests/test_reliability_runs.py).

From the step after ``SLOW_STEP_FROM`` completed ones on, each step sleeps ``SLOW_STEP_S`` seconds after its
forward pass: the BatchNorm statistics and the dropout draws of the step are already spent when a stop
request comes, so a checkpoint that does not undo them would not replay exactly. The file
``SLOW_STEP_MARKER`` is created when the first slow step is under way.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from timm_mimo.train import tasks  # noqa: E402

_step = tasks.MimoTask.step
_calls = 0


def slow_step(self, *args, **kwargs):
    global _calls
    out = _step(self, *args, **kwargs)
    _calls += 1
    if _calls > int(os.environ['SLOW_STEP_FROM']):
        Path(os.environ['SLOW_STEP_MARKER']).touch()
        time.sleep(float(os.environ.get('SLOW_STEP_S', '60')))
    return out


tasks.MimoTask.step = slow_step

if __name__ == '__main__':
    sys.exit(train.cli())
