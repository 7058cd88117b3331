"""train.py with a fault injected from the outside. The runtime code carries no hooks for
the tests: this wrapper replaces the one function a fault lives in, then runs train.py's
main() as `python train.py ARGS` does (a UserError is one line and exit status 1).

    python tests/faults.py slow_save=SECONDS -- ARGS   # each checkpoint save pauses SECONDS once its
                                                      # first bytes are on disk: the window in which a
                                                      # test kills the writer in the middle of the file
    python tests/faults.py oom_at_eval=BYTES -- ARGS   # evaluate() raises the CPU allocator's own error
                                                      # for an allocation of BYTES
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch  # noqa: E402

import train  # noqa: E402
from smolkit.common import UserError, fail  # noqa: E402


class PauseAfterFirstWrite:
    """The file torch.save writes to, pausing once after the first bytes are flushed."""

    def __init__(self, f, seconds):
        self.f, self.seconds = f, seconds

    def write(self, data):
        n = self.f.write(data)
        if self.seconds:
            self.f.flush()  # on disk, so the test sees a partial file
            seconds, self.seconds = self.seconds, 0
            time.sleep(seconds)
        return n

    def flush(self):
        return self.f.flush()


def slow_save(seconds):
    # checkpoint.save_checkpoint hands torch.save an open file (its temporary one)
    save = torch.save

    def paused_save(obj, f, *args, **kwargs):
        return save(obj, PauseAfterFirstWrite(f, float(seconds)), *args, **kwargs)
    torch.save = paused_save


def oom_at_eval(nbytes):
    # a real one cannot be provoked: an evaluation (no gradients) needs less memory than
    # the training step before it, so any cap that lets the step run lets it run too
    assert callable(train.evaluate)  # the function main() calls: a renamed one would inject nothing

    def evaluate(*args, **kwargs):
        raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes. "
                           f"Error code 12 (Cannot allocate memory)")
    train.evaluate = evaluate


FAULTS = {"slow_save": slow_save, "oom_at_eval": oom_at_eval}

if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--")
    for fault in argv[:split]:
        name, value = fault.split("=", 1)
        FAULTS[name](value)
    try:
        train.main(argv[split + 1:])
    except UserError as e:
        fail(str(e))
