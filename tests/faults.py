"""train.py with a fault injected, a GPU's choice forced or its collectives recorded, all
from the outside. The runtime code carries no hooks for the tests: this wrapper replaces
the function a change lives in, then runs train.py's main() as `python train.py ARGS` does
(a UserError is one line and exit status 1).

    python tests/faults.py slow_save=SECONDS -- ARGS   # each checkpoint save pauses SECONDS once its
                                                      # first bytes are on disk: the window in which a
                                                      # test kills the writer in the middle of the file
    python tests/faults.py oom_at_eval=BYTES -- ARGS   # evaluate() raises the CPU allocator's own error
                                                      # for an allocation of BYTES
    python tests/faults.py loss_pieces=ROWS -- ARGS    # the loss in pieces of ROWS rows, as train.py
                                                      # chooses on a GPU too small for all the logits
    python tests/faults.py expand_kv=1 -- ARGS         # attention repeats the k/v heads, as train.py
                                                      # chooses on a GPU older than compute capability 8.0
    python tests/faults.py record=DIR -- ARGS          # (under torchrun) each process writes its pid to
                                                      # DIR/pid<RANK> at the start, and at exit, to
                                                      # DIR/events<RANK>.json, the collectives it called
                                                      # from Python, each optimizer step between
                                                      # "step" and "end"
"""
import atexit
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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


def loss_pieces(rows):
    assert callable(train.loss_rows_per_piece)  # the function main() calls: a renamed one would force nothing
    train.loss_rows_per_piece = lambda device, step_rows, vocab_size: int(rows)


def expand_kv(value):
    expand = bool(int(value))
    assert callable(train.expand_kv)
    train.expand_kv = lambda device: expand
    wrap = train.wrap_for_training

    def checked(model, *args, **kwargs):  # the model as main() set it up, before DDP and compile
        assert model.expand_kv is expand, "train.py did not set model.expand_kv from expand_kv(device)"
        return wrap(model, *args, **kwargs)
    train.wrap_for_training = checked


# every collective of torch.distributed a Python caller can make; DDP's own gradient buckets go
# through its C++ reducer and never pass here
COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce",
               "reduce_scatter", "all_to_all", "gather", "scatter", "all_gather_object", "broadcast_object_list")


def record(folder):
    rank, events = os.environ.get("RANK", "0"), []
    with open(os.path.join(folder, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    for name in COLLECTIVES:
        def collective(*args, _name=name, _real=getattr(dist, name), **kwargs):
            tensor = args[0] if args and hasattr(args[0], "numel") else None
            events.append(_name if tensor is None else f"{_name} of {tensor.numel()}")
            return _real(*args, **kwargs)
        setattr(dist, name, collective)
    step = train.train_step

    def recorded_step(*args, **kwargs):
        events.append("step")
        result = step(*args, **kwargs)
        events.append("end")
        return result
    train.train_step = recorded_step
    atexit.register(lambda: json.dump(events, open(os.path.join(folder, f"events{rank}.json"), "w")))


FAULTS = {"slow_save": slow_save, "oom_at_eval": oom_at_eval, "loss_pieces": loss_pieces, "expand_kv": expand_kv,
          "record": record}

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
