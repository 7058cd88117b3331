"""What each GPU gets by default (dtype, TF32, loss path, attention's k/v heads, MFU peak)
and how torchrun processes share a step, checked on a CPU with the CUDA queries replaced:
the figures here are the cards' datasheets and the names torch.cuda.get_device_name returns
for them. Also train.py's step: one wait for the device, the next batch built before it,
fp16's skipped steps, the stop signals the processes agree on."""
import os
from types import SimpleNamespace

import pytest
import torch

from smol import SmolConfig, SmolLM
from smolkit import common
from smolkit.common import (UserError, autocast_for, expand_kv, inference_dtype, loss_rows_per_piece, peak_flops,
                            pick_dtype)
from smolkit.data import load_splits
from smolkit.samplers import BatchSampler, shard
from train import train_step

GiB = 2**30
# (name, compute capability, total memory in bytes as torch reports it)
T4 = ("Tesla T4", (7, 5), 15_835_660_288)
V100 = ("Tesla V100-SXM2-16GB", (7, 0), 16_935_682_048)
A100_40 = ("NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344)
H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 85_045_935_104)
H200 = ("NVIDIA H200", (9, 0), 150_754_820_096)


@pytest.fixture
def card(monkeypatch):
    """Make torch.cuda describe the given card; is_bf16_supported says yes, as it does on a T4."""
    def use(name, capability, memory):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(total_memory=memory, name=name))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return use


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast's, for a "cuda" context made on a CPU
@pytest.mark.parametrize("which, dtype", [(T4, "float16"), (V100, "float16"), (A100_40, "bfloat16"),
                                          (H100, "bfloat16"), (("NVIDIA GeForce RTX 3090", (8, 6), 25 * GiB), "bfloat16")])
def test_dtype_follows_compute_capability(card, which, dtype):
    card(*which)
    name, why = pick_dtype("cuda")
    assert name == dtype and f"compute capability {which[1][0]}.{which[1][1]}" in why
    assert inference_dtype("cuda:0") == getattr(torch, dtype)  # sample.py and serve.py alike
    assert autocast_for("cuda", "auto")[0] == dtype
    assert pick_dtype("cuda", "float32") == ("float32", "--dtype")  # a flag overrides the rule


class Untouchable:
    """Stands in for torch.backends.cuda.matmul and torch.backends.cudnn: any use of them fails."""

    def __getattr__(self, name):
        raise AssertionError(f"read {name}")

    def __setattr__(self, name, value):
        raise AssertionError(f"set {name} = {value}")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("which", [V100, H100])
def test_cuda_runs_get_tf32_through_the_one_matmul_precision_api(card, monkeypatch, which):
    # torch.set_float32_matmul_precision("high") alone: the legacy allow_tf32 flags warn on torch
    # 2.9+, and mixing them with the fp32_precision API broke torch.compile (pytorch#166387)
    card(*which)
    precision = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", precision.append)
    monkeypatch.setattr(torch.backends.cuda, "matmul", Untouchable())
    monkeypatch.setattr(torch.backends, "cudnn", Untouchable())
    autocast_for("cpu", "float32")
    assert precision == []  # a CPU run leaves it alone, as importing does
    for dtype in ("auto", "float32"):
        autocast_for("cuda:0", dtype)
    assert precision == ["high", "high"]


def test_cpu_dtype_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("cpu") == ("float32", "no native bf16 on this CPU")
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("cpu") == ("bfloat16", "native bf16 on this CPU")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA H800", 989), ("NVIDIA H800 PCIe", 756),
    ("NVIDIA B200", 2250), ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA A10G", 70),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA GeForce RTX 4090", 165), ("Tesla V100-SXM2-16GB", 125), ("Tesla V100-PCIE-32GB", 112),
    ("Tesla T4", 65), ("NVIDIA GeForce GTX 1080", None), ("NVIDIA RTX A6000", None)])
def test_mfu_peak_by_the_exact_device_name(card, name, tflops):
    card(name, (8, 0), 40 * GiB)
    assert peak_flops("cuda") == (tflops * 1e12 if tflops else None)
    assert peak_flops("cpu") is None


@pytest.mark.parametrize("which, batch, block, rows", [
    (T4, 16, 512, 1365),      # 16 x 512 x 49,152 logits at 16 bytes: 6.4 GB, over a quarter of 15.8 GB
    (A100_40, 16, 512, None),  # under a quarter of 42.5 GB: the plain loss
    (H100, 16, 512, None),
    (H100, 16, 2048, 1365),    # 25.8 GB, over a quarter of 85 GB
    (H200, 16, 2048, None),    # under a quarter of 151 GB
    (T4, 4, 256, None),        # 0.8 GB
    (("NVIDIA A10G", (8, 6), 23_609_475_072), 16, 512, 1365),  # the 24 GB cards report under 24 GiB
    (("NVIDIA L4", (8, 9), 23_034_462_208), 16, 512, 1365),
    (("NVIDIA GeForce RTX 4090", (8, 9), 25_386_352_640), 16, 512, 1365),
    (("Tesla V100-SXM2-32GB", (7, 0), 34_089_730_048), 16, 512, None),
    (V100, 16, 512, 1365)])
def test_loss_in_one_piece_where_the_device_holds_its_logits(card, which, batch, block, rows):
    card(*which)
    assert loss_rows_per_piece("cuda", batch * block, 49152) == rows


def test_loss_rule_on_a_cpu_reads_the_machine_memory(monkeypatch):
    # 16 x 512 x 49,152 logits x 16 bytes = 6 GiB: one piece from 24 GiB of RAM
    for ram, rows in [(16, 1365), (23, 1365), (24, None), (64, None)]:
        monkeypatch.setattr(common, "device_memory", lambda device: ram * GiB)
        assert loss_rows_per_piece("cpu", 16 * 512, 49152) == rows, ram
    assert loss_rows_per_piece("cpu", 4 * 256, 49152) is None  # bench.py's CPU shape: one piece anywhere


@pytest.mark.parametrize("which, expand", [(V100, True), (T4, True), (A100_40, False),
                                           (("NVIDIA GeForce RTX 3090", (8, 6), 25 * GiB), False), (H100, False)])
def test_kv_heads_are_repeated_on_cards_without_the_flash_kernel(card, which, expand):
    # SDPA takes grouped k/v heads (enable_gqa) in its flash kernel only, from compute capability 8.0
    card(*which)
    assert expand_kv("cuda") is expand and expand_kv("cuda:1") is expand


def test_kv_heads_stay_grouped_off_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("asked CUDA")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    assert expand_kv("cpu") is False and expand_kv("mps") is False


def test_expanded_kv_heads_are_not_saved():
    # a property of the run on its device, like loss_rows_per_piece: a checkpoint holds the same
    # tensors either way, and a model read back groups its heads until train.py decides again
    import io

    from smolkit.checkpoint import model_from_checkpoint, training_checkpoint
    from train import TrainConfig
    model = tiny_model()
    model.expand_kv = True
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    ckpt = training_checkpoint(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), TrainConfig(), 0,
                               float("inf"), None)
    assert ckpt["model"].keys() == tiny_model().state_dict().keys()
    saved = io.BytesIO()
    torch.save(ckpt, saved)
    assert b"expand_kv" not in saved.getvalue()
    assert model_from_checkpoint(ckpt).expand_kv is False


@pytest.mark.parametrize("batch, accum, world, share", [
    (16, 1, 1, (1, 16)), (16, 1, 2, (1, 8)), (16, 1, 4, (1, 4)), (16, 1, 8, (1, 2)),  # the defaults
    (16, 4, 2, (2, 16)), (16, 8, 8, (1, 16)),  # whole micro steps where they divide
    (6, 3, 2, (3, 3))])
def test_processes_share_a_step_equally(batch, accum, world, share):
    assert shard(batch, accum, world) == share


def test_a_step_that_cannot_be_shared_is_refused():
    with pytest.raises(UserError, match="3 processes cannot share a step of --gradient_accumulation_steps 1 x "
                                        "--batch_size 16 rows equally: make one of the two a multiple of 3"):
        shard(16, 1, 3)


@pytest.mark.parametrize("device, backend, bound", [("cuda", "nccl", torch.device("cuda:1")), ("cpu", "gloo", None)])
def test_each_process_names_its_gpu_to_the_process_group(monkeypatch, device, backend, bound):
    # without device_id, barrier() warns that it guesses the GPU; a CPU process has none to name
    for name, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(common.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    rank_world_device = (3, 4, "cuda:1" if device == "cuda" else "cpu", backend)
    assert common.start_processes(device) == rank_world_device
    assert calls[-1] == ((backend,), {"device_id": bound})


def test_ddp_wraps_the_model_before_it_is_compiled(monkeypatch):
    # compiling the DDP module lets DDPOptimizer split the graph at the gradient buckets, so
    # their all-reduces overlap the backward; one graph per shape (tests/test_ddp.py says why)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append((module, kwargs)) or "compiled")
    monkeypatch.setattr(common, "DDP", lambda module, **kwargs: ("DDP", module, kwargs))
    model = object()
    assert common.wrap_for_training(model, "cuda:1", ddp=True, compiled=True) == "compiled"
    assert compiled == [(("DDP", model, {"device_ids": ["cuda:1"], "broadcast_buffers": False}), {"dynamic": False})]
    assert common.wrap_for_training(model, "cpu", ddp=True, compiled=False) == ("DDP", model, {
        "device_ids": None, "broadcast_buffers": False})
    assert common.wrap_for_training(model, "cuda", ddp=False, compiled=True) == "compiled"
    assert compiled[-1] == (model, {})  # alone: shapes may turn dynamic (conversations' padded rows)
    assert common.wrap_for_training(model, "cpu", ddp=False, compiled=False) is model


@pytest.fixture(scope="module")
def splits():
    return load_splits(os.path.join(common.ROOT, "input.txt"), 32, 49152)


@pytest.mark.parametrize("accum, world", [(1, 2), (1, 4), (1, 8), (4, 2), (2, 4)])
def test_the_processes_rows_are_one_process_rows(splits, accum, world):
    # with the same seed, the rows of every step over all processes are those one process draws
    one = BatchSampler(splits, 32, 8, "cpu", seed=7, share=(0, 1, accum))
    many = [BatchSampler(splits, 32, 8, "cpu", seed=7, share=(r, world, accum)) for r in range(world)]
    micro, _ = shard(8, accum, world)
    for _ in range(3):  # steps
        alone = sorted(map(tuple, torch.cat([one.next()[0] for _ in range(accum)]).tolist()))
        shared = sorted(map(tuple, torch.cat([s.next()[0] for s in many for _ in range(micro)]).tolist()))
        assert alone == shared


def tiny_model():
    torch.manual_seed(0)
    return SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, block_size=32))


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")


def test_a_training_step_waits_once_and_builds_the_next_batch_first(monkeypatch, splits):
    # every call of this project's code that would wait for a GPU (but the data sampler's: its
    # window offsets live on the host), and each batch built, in order. torch's own CPU AdamW
    # reads its step counts (host tensors) with .item(); the fused CUDA one does not
    import sys

    from smolkit import samplers
    events = []
    for name in SYNCS:
        method = getattr(torch.Tensor, name)

        def spy(self, *a, _method=method, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            project = os.path.abspath(caller).startswith(common.ROOT + os.sep) and "tests" not in caller
            if project and not caller.endswith("samplers.py"):
                events.append(f"sync {_name}")
            return _method(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    built = samplers.BatchSampler.batch
    monkeypatch.setattr(samplers.BatchSampler, "batch", lambda self, *a: events.append("batch") or built(self, *a))
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for accum in (1, 2):
        sampler = BatchSampler(splits, 32, 4, "cpu", seed=1, share=(0, 1, accum))
        events.clear()
        for _ in range(3):
            assert train_step(model, optimizer, scaler, sampler, accum, torch.autocast("cpu", enabled=False),
                              1.0)[1] is None  # alone: no votes to stop
            events.append("step")
        # the first batch, then per step: the rest of its batches and the next step's first, then one wait
        per_step = ["batch"] * accum + ["sync tolist", "step"]
        assert events == ["batch"] + per_step * 3, events


def test_stop_flag_is_read_without_the_device():
    from smolkit import guards
    guard = guards.Guard(SimpleNamespace(out_dir="unused"), None, "cpu", 0, ddp=False, master=True, saved_step=None)
    calls = []
    real = torch.tensor
    torch.tensor = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert guard.stop_requested() == 0
        guard.signals.append(15)
        assert guard.stop_requested() == 15
    finally:
        torch.tensor = real
    assert calls == []  # no tensor made, so nothing copied to a device and back


@pytest.mark.parametrize("firsts, signum", [
    ([None, None], 0), ([None, 15], 15), ([2, None], 2), ([15, 15], 15), ([2, 2, 2, 2], 2),
    ([2, 15, None], 15),  # Ctrl-C in one process, a scheduler's SIGTERM in another: SIGTERM, as max() gave
    ([None] * 7 + [2], 2)])
def test_processes_agree_on_the_signal_to_stop_on(firsts, signum):
    # each process's votes, summed as train_step's all-reduce sums them (with the loss): every
    # process reads the same signal from the sums, the highest-numbered first signal of any
    from smolkit import guards
    votes = []
    for first in firsts:
        guard = guards.Guard(SimpleNamespace(out_dir="unused"), None, "cpu", 0, ddp=True, master=True, saved_step=None)
        guard.signals += [first, 2] if first else []  # a later signal does not change a process's vote
        votes.append(guard.stop_votes())
    summed = [sum(column) for column in zip(*votes)]
    assert guard.stop_requested(summed) == signum


def test_fp16_step_with_overflowing_gradients_is_skipped_not_fatal(splits):
    # a loss scale so large that the scaled gradients are inf: GradScaler skips the update and
    # halves the scale; the loss itself is finite, so the run goes on
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    sampler = BatchSampler(splits, 32, 4, "cpu", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = train_step(model, optimizer, scaler, sampler, 1, torch.autocast("cpu", dtype=torch.float16), 1.0)
    assert loss == loss and loss < 20  # finite
    assert scaler.get_scale() == 2.0**119
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the update was skipped
    scaler = torch.amp.GradScaler("cpu")  # a normal scale: the next step updates
    train_step(model, optimizer, scaler, sampler, 1, torch.autocast("cpu", dtype=torch.float16), 1.0)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
