"""train.py with what a CPU cannot reach forced from the outside, or its collectives
recorded, as tests/faults.py injects faults: the runtime code carries no hooks for the
tests; this wrapper replaces a function, then runs train.py's main() as `python train.py
ARGS` does (a UserError is one line and exit status 1).

    python tests/instrumented.py loss_pieces=ROWS -- ARGS  # the loss in pieces of ROWS rows, as train.py
                                                          # chooses on a GPU too small for all the logits
    python tests/instrumented.py expand_kv=1 -- ARGS       # attention repeats the k/v heads, as train.py
                                                          # chooses on a GPU older than compute capability 8.0
    python tests/instrumented.py record=DIR -- ARGS        # (under torchrun) each process writes its pid to
                                                          # DIR/pid<RANK> at the start, and at exit, to
                                                          # DIR/events<RANK>.json, the collectives it called
                                                          # from Python, each optimizer step between
                                                          # "step" and "end"
"""
import atexit
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402
from smolkit.common import UserError, fail  # noqa: E402


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


CHANGES = {"loss_pieces": loss_pieces, "expand_kv": expand_kv, "record": record}

if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--")
    for change in argv[:split]:
        name, value = change.split("=", 1)
        CHANGES[name](value)
    try:
        train.main(argv[split + 1:])
    except UserError as e:
        fail(str(e))
