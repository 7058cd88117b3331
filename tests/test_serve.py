"""serve.py as a real process on a free port of 127.0.0.1, spoken to by real clients:
the official openai package and httpx."""
import asyncio
import json
import socket
import subprocess
import sys
import types

import httpx
import pytest
import torch

from conftest import error_of, need_module, on_cpu, wait_for
from smolkit.chat import render_chat
from smolkit.common import ROOT
from smolkit.data import load_tokenizer
from smolkit.hf import from_pretrained


@pytest.fixture(scope="module")
def openai():
    return need_module("openai", "pip install openai")

QUESTIONS = {"What is the capital of France?": "Paris.", "What is the capital of Italy?": "Rome.",
             "What color is the sky?": "Blue.", "Say hello.": "Hello!"}


@pytest.fixture(scope="module")
def client(chat_server, openai):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(chat_model):
    """The same weights in this process: what greedy decoding must give, computed by
    SmolLM.generate (itself checked against transformers in test_hf.py)."""
    model, tok = from_pretrained(str(chat_model["hf"])).eval(), load_tokenizer()

    def greedy(prompt_ids, n):
        out = model.generate(torch.tensor([prompt_ids]), n, temperature=0)[0, len(prompt_ids):].tolist()
        return tok.decode(out)
    return greedy, tok


def test_models_and_health(chat_server, client):
    assert [m.id for m in client.models.list().data] == ["hf"]
    h = health(chat_server)
    assert h["status"] == "ok" and h["chat"] is True and h["context_length"] == 8192
    assert h["active_requests"] == 0 and h["decoding"] == 0 and h["waiting"] == 0
    assert all(isinstance(h[k], int) for k in ("tokens_generated", "decode_steps", "last_batch", "prefill_passes"))


def test_chat_completion_with_the_openai_client(client, reference):
    _, tok = reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="hf", messages=messages, temperature=0)
    assert r.choices[0].message.content == "Paris." and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "hf"
    assert r.usage.prompt_tokens == len(tok.encode(render_chat(messages)).ids)
    assert r.usage.completion_tokens == 3 and r.usage.total_tokens == r.usage.prompt_tokens + 3  # Paris . <|im_end|>


def test_streamed_chat_completion_with_the_openai_client(client):
    messages = [{"role": "user", "content": "Say hello."}]
    stream = client.chat.completions.create(model="hf", messages=messages,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    # the counts as the tokenizer gives them: the prompt, and the reply's tokens with its <|im_end|>
    tok = load_tokenizer()
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(render_chat(messages)).ids)
    assert chunks[-1].usage.completion_tokens == len(tok.encode("Hello!").ids) + 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_completion_runs_to_max_tokens_as_generate_does(client, reference):
    greedy, tok = reference
    prompt = "<|im_start|>user\nWhat color"
    expected = greedy(tok.encode(prompt).ids, 30)
    r = client.completions.create(model="hf", prompt=prompt, max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 30
    streamed = client.completions.create(model="hf", prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_stops_at_the_end_of_text_token(client):
    r = client.completions.create(model="hf", prompt="<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n",
                                  max_tokens=50, temperature=0)
    assert r.choices[0].text == "Hello!" and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(client, stream):
    r = client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "Say hello."}],
                                       temperature=0, stop=["lo!", "zzz"], stream=stream)
    if stream:
        chunks = [c for c in r if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == "Hel" and finish == "stop"  # nothing of the stop string is ever sent


def test_a_seed_makes_sampling_repeatable(client):
    # a prompt unlike anything the tiny model was trained on, at a high temperature: a
    # wide distribution over next tokens (after "Once" it writes its system line at any seed)
    def sample(seed):
        return client.completions.create(model="hf", prompt="Story about", max_tokens=20, temperature=1.5, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
BAD = {  # request body -> (status, param, words the message must contain)
    "malformed JSON": ('{"messages": [', 400, None, "not valid JSON"),
    "no body": ("", 400, None, "JSON body"),
    "missing messages": ({"temperature": 0}, 400, "messages", "Field required"),
    "messages not a list": ({"messages": "Hi"}, 400, "messages", "valid list"),
    "no messages": ({"messages": []}, 400, "messages", "at least 1"),
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages.0.role", "'user'"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "string"),
    "max_tokens 0": ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    "max_tokens a string": ({**CHAT, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    "temperature too high": ({**CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    "n 2": ({**CHAT, "n": 2}, 400, "n", "less than or equal to 1"),
    "stream not a bool": ({**CHAT, "stream": "yes"}, 400, "stream", "boolean"),
    "unknown model": ({**CHAT, "model": "gpt-4o"}, 404, "model", "does not exist"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages",
                                "maximum context length is 8192"),
    "max_tokens over the context": ({**CHAT, "max_tokens": 9000}, 400, "max_tokens", "maximum context length"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_client_mistake_gets_an_openai_style_4xx(chat_server, name):
    body, status, param, words = BAD[name]
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(chat_server.url + "/health").status_code == 200  # and the server goes on


def test_completion_mistakes_and_wrong_paths(chat_server, client, openai):
    r = httpx.post(chat_server.url + "/v1/completions", json={"prompt": ["a", 1]})  # text and ids mixed
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.get(chat_server.url + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["message"]
    r = httpx.get(chat_server.url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="hf", messages=CHAT["messages"], max_tokens=0)


def test_sixteen_clients_streaming_at_once_all_get_their_answers(chat_server, reference):
    greedy, tok = reference
    prompts = [f"Story {i}:" for i in range(4)]
    expected = {p: greedy(tok.encode(p).ids, 40) for p in prompts}

    async def chat(http, question):
        text = ""
        async with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        return text

    async def complete(http, prompt):
        text = ""
        async with http.stream("POST", "/v1/completions", json={
                "prompt": prompt, "temperature": 0, "max_tokens": 40, "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def sampled(http, seed):  # sampled, with its own seed: the same text alone and among others
        r = await http.post("/v1/completions", json={"prompt": "Once", "temperature": 1.0, "seed": seed,
                                                     "max_tokens": 30, "ignore_eos": True})
        return r.json()["choices"][0]["text"]

    async def alone():
        async with httpx.AsyncClient(base_url=chat_server.url, timeout=120) as http:
            return [await sampled(http, seed) for seed in range(4)]

    async def everyone():
        async with httpx.AsyncClient(base_url=chat_server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as http:
            questions = list(QUESTIONS) * 2
            return await asyncio.gather(*[chat(http, q) for q in questions], *[complete(http, p) for p in prompts[:4]],
                                        *[sampled(http, seed) for seed in range(4)])

    by_seed = asyncio.run(alone())
    steps = health(chat_server)["decode_steps"]
    results = asyncio.run(everyone())
    assert results[:8] == list(QUESTIONS.values()) * 2
    assert results[8:12] == [expected[p] for p in prompts[:4]]  # sharing a batch changes nothing
    assert results[12:] == by_seed
    # they were decoded together: one after another, the completions alone take 4 x 39 + 4 x 29
    # steps (a token of each comes from its prefill); sharing steps, about 40
    assert health(chat_server)["decode_steps"] - steps < (4 * 39 + 4 * 29) // 2


def health(server):
    return httpx.get(server.url + "/health").json()


def active_requests(server):
    return health(server)["active_requests"]


def tokens_generated(server):
    return health(server)["tokens_generated"]


def test_a_disconnect_frees_its_row_for_the_next_step(chat_server):
    body = {"prompt": "Once", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", chat_server.url + "/v1/completions", timeout=60, json=body) as stays:
        kept = stays.iter_lines()
        with httpx.stream("POST", chat_server.url + "/v1/completions", timeout=60, json=body) as goes:
            lines = goes.iter_lines()
            for _ in range(4):
                next(lines)
            wait_for(lambda: health(chat_server)["last_batch"] == 2, "the two streams never shared a step")
        # closed: the next steps are of one row, and the stream that stays goes on
        wait_for(lambda: health(chat_server)["decoding"] == 1, "the closed stream still has its row")
        steps = health(chat_server)["decode_steps"]
        wait_for(lambda: health(chat_server)["decode_steps"] > steps, "no step after the disconnect")
        assert health(chat_server)["last_batch"] == 1
        assert all(sse(next(kept)) in (None, "text") for _ in range(10))
    wait_for(lambda: active_requests(chat_server) == 0, "a closed stream is still active")


def test_a_client_that_goes_away_stops_its_generation(chat_server):
    before = tokens_generated(chat_server)
    with httpx.stream("POST", chat_server.url + "/v1/completions", timeout=60, json={
            "prompt": "Once", "max_tokens": 8000, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()  # held: a loop broken out of would close the response here already
        for _ in range(10):
            next(lines)
        assert active_requests(chat_server) == 1
    wait_for(lambda: active_requests(chat_server) == 0, "the request of a client that went away is still active")
    # a request after it takes the worker after any step of the stopped one still queued there
    three = {"prompt": "Once", "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(chat_server.url + "/v1/completions", json=three, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 3
    stopped = tokens_generated(chat_server) - before - 3
    assert 0 < stopped < 8000, stopped  # it ended long before its max_tokens
    # and none of it comes later: the next request moves the counter by its own 3 tokens only
    after = tokens_generated(chat_server)
    r = httpx.post(chat_server.url + "/v1/completions", json=three, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert tokens_generated(chat_server) == after + 3
    assert active_requests(chat_server) == 0


def sse(line):
    """One line of a stream: None (not an event), "done", "usage", a finish_reason, or "text"."""
    if not line.startswith("data: "):
        return None
    if line == "data: [DONE]":
        return "done"
    chunk = json.loads(line[6:])
    return "usage" if not chunk["choices"] else chunk["choices"][0]["finish_reason"] or "text"


def test_a_whole_context_prompt_is_answered_while_an_earlier_stream_goes_on(chat_server):
    """Requests are served side by side, not one after another: a whole-context prompt
    sent while an 8,000-token stream runs is answered before that stream ends, and the
    stream goes on after it. One event loop reads both streams and records what arrives
    in order."""
    arrivals = []  # ("steady" or "long", what sse() says), in the order they arrive
    usage = {}
    prompt = "word" + " word" * 8189  # 8,190 tokens: the whole context of 8,192 with its 2 new ones

    async def both():
        started, answered = asyncio.Event(), asyncio.Event()

        async def steady(http):  # a stream running before, during and after the long prompt
            async with http.stream("POST", "/v1/completions", json={
                    "prompt": "Once", "max_tokens": 8000, "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if what := sse(line):
                        arrivals.append(("steady", what))
                    if len(arrivals) >= 10:
                        started.set()
                    if answered.is_set() and len(arrivals) - arrivals.index(("long", "done")) > 20:
                        return  # 20 more after the long prompt's answer: enough (closing stops it)

        async def long(http):
            await started.wait()
            async with http.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if what := sse(line):
                        arrivals.append(("long", what))
                    if what == "usage":
                        usage.update(json.loads(line[6:])["usage"])
            answered.set()

        async with httpx.AsyncClient(base_url=chat_server.url, timeout=120) as http:
            await asyncio.gather(steady(http), long(http))

    asyncio.run(both())
    assert usage["prompt_tokens"] == 8190 and usage["completion_tokens"] == 2
    assert [what for who, what in arrivals if who == "long"][-3:] == ["length", "usage", "done"]
    answer = arrivals.index(("long", "done"))
    steady = [what for who, what in arrivals if who == "steady"]
    before = [what for who, what in arrivals[:answer] if who == "steady"]
    assert len(before) >= 10 and set(before) == {"text"}, "the stream ended before the long prompt's answer"
    after = steady[len(before):]
    assert len(after) >= 20 and set(after) == {"text"}, "the stream did not go on after the long prompt's answer"
    wait_for(lambda: active_requests(chat_server) == 0, "the closed stream is still active")


def run_serve(*args, prelude="pass"):
    """serve.py's command line in a subprocess; prelude runs first in the same interpreter."""
    code = f"{prelude}; import runpy, sys; sys.argv = ['server', *sys.argv[1:]]; " \
           f"runpy.run_module('server', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code, *on_cpu(args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_a_port_in_use_is_one_line(chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_serve("--init_from", chat_model["hf"], "--port", port)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    # an address of no interface here (TEST-NET-1: never assigned to a real host)
    proc = run_serve("--init_from", chat_model["hf"], "--host", "192.0.2.1")
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot listen on 192.0.2.1:8000 (Cannot assign")


@pytest.mark.parametrize("lacking, message", [
    (["fastapi"], "fastapi"), (["uvicorn"], "uvicorn"), (["fastapi", "uvicorn"], "fastapi and uvicorn")])
def test_without_fastapi_or_uvicorn_the_server_says_what_to_install(lacking, message):
    prelude = "import sys; " + "; ".join(f"sys.modules[{name!r}] = None" for name in lacking)  # as if not installed
    proc = run_serve(prelude=prelude)
    assert proc.returncode == 1
    assert proc.stderr == f"error: the server needs {message}: pip install -r requirements-serve.txt\n"


def test_max_waiting_below_one_is_refused_in_one_line():
    # every request waits in the line for its row, if only for a step: with no room in it, none could be served
    proc = run_serve("--max_waiting", "0")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "error: --max_waiting must be positive, got 0\n")


def test_a_request_waiting_past_a_second_is_told_its_place_again_on_every_python(monkeypatch):
    # Before Python 3.11, asyncio.wait_for's timeout raises asyncio.TimeoutError, a class of
    # its own, not the builtin TimeoutError; since 3.11 the two are one. The server's module
    # is given an asyncio whose wait_for raises such a class of its own, as 3.10's does: the
    # stream must go on, telling the client its place in line, not fail
    for name in ("fastapi", "uvicorn"):
        need_module(name, "pip install -r requirements-serve.txt")
    from server import app

    class TimeoutOfPython310(Exception):
        pass

    async def wait_for(awaitable, timeout):
        awaitable.close()  # the queue's get, never awaited: nothing arrives within the timeout
        raise TimeoutOfPython310()
    monkeypatch.setattr(app, "asyncio", types.SimpleNamespace(wait_for=wait_for, TimeoutError=TimeoutOfPython310))
    served = object.__new__(app.ServedModel)
    served.tokenizer, served.batcher = load_tokenizer(), types.SimpleNamespace(ahead=lambda seq, for_a_row=False: 2)
    seq, req = types.SimpleNamespace(cancelled=False), types.SimpleNamespace(stop=None)

    async def disconnected():
        return False

    async def first_pieces():
        pieces = served.generate(seq, asyncio.Queue(), req, {0}, types.SimpleNamespace(is_disconnected=disconnected),
                                 [])
        got = [await pieces.__anext__() for _ in range(3)]
        await pieces.aclose()
        return got
    assert asyncio.run(first_pieces()) == [(None, 2)] * 3  # at once, then after each wait that timed out
    assert seq.cancelled  # its row is given up when the stream ends
