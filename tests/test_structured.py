"""Structured output and tool calls (smolkit/grammar.py, the server's response_format, tools
and tool_choice, sample.py --json_schema): driven with the official openai client against
the real server on the official SmolLM2-135M-Instruct weights, each reply parsed and
validated with jsonschema; the refusals on the tiny chat model's server; the mask per row
inside the Batcher; the tool format of chat.py's template against transformers'."""
import json
import os
import re
import subprocess
import threading

import httpx
import pytest
import torch

from conftest import command, error_of, need_module
from server.openai_api import CallReader
from smolkit.chat import CHAT_TEMPLATE, render_chat
from smolkit.common import ROOT
from smolkit.data import load_tokenizer

need_module("llguidance", "pip install llguidance")
jsonschema = need_module("jsonschema", "pip install jsonschema")
TOKENIZER = load_tokenizer()
MODEL = "SmolLM2-135M-Instruct"

# each a schema feature of the issue's list, with a question the model can answer in it
SCHEMAS = {
    "enum": ("What color is the sky? Answer in JSON.",
             {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False}),
    "integer bounds": ("How old is a person born in 1990, in 2020? Answer in JSON.",
                       {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
                        "required": ["age"], "additionalProperties": False}),
    "nested objects": ("Where is the Eiffel Tower? Answer in JSON.",
                       {"type": "object", "required": ["place"], "additionalProperties": False,
                        "properties": {"place": {
                            "type": "object", "required": ["city", "country"], "additionalProperties": False,
                            "properties": {"city": {"type": "string", "maxLength": 30},
                                           "country": {"type": "string", "maxLength": 30}}}}}),
    "array bounds": ("Name some fruits. Answer in JSON.",
                     {"type": "object", "required": ["fruits"], "additionalProperties": False,
                      "properties": {"fruits": {"type": "array", "minItems": 2, "maxItems": 3,
                                                "items": {"type": "string", "maxLength": 20}}}}),
    "anyOf with null": ("Does a cat have a middle name? Answer in JSON.",
                        {"type": "object", "required": ["middle_name"], "additionalProperties": False,
                         "properties": {"middle_name": {"anyOf": [{"type": "string", "maxLength": 20},
                                                                  {"type": "null"}]}}}),
    "booleans and numbers": ("Is water wet, and how warm is a hot bath in Celsius? Answer in JSON.",
                             {"type": "object", "required": ["wet", "celsius"], "additionalProperties": False,
                              "properties": {"wet": {"type": "boolean"},
                                             "celsius": {"type": "number", "minimum": 0, "maximum": 100}}}),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a city",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(instruct_server):
    openai = need_module("openai", "pip install openai")
    return openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("feature", SCHEMAS)
def test_json_schema_replies_parse_and_validate(client, feature):
    question, schema = SCHEMAS[feature]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "answer", "schema": schema, "strict": True}},
                                       temperature=0, max_tokens=120)
    reply = r.choices[0]
    assert reply.finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.message.content), schema)
    outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', reply.message.content)
    assert not re.search(r"\s", outside_strings), reply.message.content  # compact: no whitespace between tokens


def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel, Field

    class City(BaseModel):  # docs/chat-and-serve.md's example
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
    r = client.chat.completions.parse(model=MODEL, response_format=City, temperature=0, max_tokens=80,
                                      messages=[{"role": "user", "content": "Tell me about Paris."}])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.parsed == City(name="Paris", country="France")  # as the docs print it


def test_json_object_and_completions_with_a_schema(client, instruct_server):
    r = client.chat.completions.create(model=MODEL, response_format={"type": "json_object"}, temperature=0,
                                       max_tokens=100, messages=[{"role": "user", "content": "Describe Paris."}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    body = {"prompt": ["The capital of France, as JSON:", "The capital of Italy, as JSON:"], "max_tokens": 40,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    choices = httpx.post(instruct_server.url + "/v1/completions", json=body, timeout=120).json()["choices"]
    assert [c["finish_reason"] for c in choices] == ["stop", "stop"]  # each prompt its own grammar
    for c in choices:
        jsonschema.validate(json.loads(c["text"]), schema)


def test_streamed_json_joins_into_the_whole_reply(client):
    question, schema = SCHEMAS["nested objects"]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=120,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert sum(bool(c.choices[0].delta.content) for c in chunks) > 3  # in pieces
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text == client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_logprobs_are_the_models_own_not_the_masked_ones(client):
    # the first token of a JSON object can only be "{" under the mask; the model's own
    # distribution (what is reported) is the same as without a schema
    kwargs = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=3, logprobs=True, top_logprobs=5)
    free = client.chat.completions.create(**kwargs).choices[0].logprobs.content[0]
    held = client.chat.completions.create(response_format={"type": "json_object"}, **kwargs)
    first = held.choices[0].logprobs.content[0]
    assert first.token.startswith("{")
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [(t.token, t.logprob) for t in free.top_logprobs]
    assert first.logprob < -1  # not 0, as the masked distribution would say of a forced token


def test_max_tokens_inside_the_json_is_length(client):
    question, schema = SCHEMAS["nested objects"]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                               "schema": schema}},
                                       temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_tool_call_has_arguments_that_validate(client, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                       parallel_tool_calls=True, temperature=0, max_tokens=60)  # one call, still
    reply = r.choices[0]
    assert reply.finish_reason == ("tool_calls" if choice == "required" else "stop")  # as OpenAI and vLLM say
    assert reply.message.content is None and len(reply.message.tool_calls) == 1
    call = reply.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    assert choice == "required" or call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_streamed_tool_call_comes_in_openais_pieces(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(c.id is None and c.function.name is None and c.index == 0 for c in calls[1:])
    assert len(calls) > 3  # the arguments in pieces
    arguments = "".join(c.function.arguments or "" for c in calls)
    assert chunks[-1].choices[0].finish_reason == "stop"
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    assert arguments == whole.function.arguments
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_the_tool_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # as OpenAI's
                      {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]   # docs send it
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=60)
    answer = r.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert "22" in answer.message.content or "sunny" in answer.message.content.lower(), answer.message.content
    # what the model read: the call in its own form, the result as chat.py's template renders it
    prompt = render_chat([*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          messages[-1]], tools=[WEATHER])
    assert r.usage.prompt_tokens == len(TOKENIZER.encode(prompt).ids)
    assert f'<tool_call>{{"name":"get_weather","arguments":{call.function.arguments}}}</tool_call>' in prompt
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in prompt


def test_auto_answers_in_words_or_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], temperature=0, max_tokens=30)  # tool_choice: auto
    reply = r.choices[0]
    if reply.message.tool_calls:  # whichever the model chose, it is well formed
        assert reply.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(reply.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    else:
        assert reply.message.content and not reply.message.content.startswith("<")


BIG = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20000)},
       "required": [f"p{i}" for i in range(20000)]}  # 0.8 MB: within the body limit, past the grammar's
BAD = {  # extra fields of a chat request -> (param, words the message must contain)
    "unknown response_format": ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    "a schema it cannot compile": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "string", "pattern": "(?=a)b"}}}}, "response_format", "look-around"),
    "a schema too large": ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": BIG}}},
                           "response_format", "too large"),
    "json_schema without its schema": ({"response_format": {"type": "json_schema"}}, "response_format",
                                       "json_schema is given with type json_schema"),
    "a tool without parameters": ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                                  "tools.0.function.parameters", "Field required"),
    "a named tool not in tools": ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {
        "name": "get_time"}}}, "tool_choice", "no function named 'get_time' in tools"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice", "no tools to call"),
    "an unknown tool_choice": ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'required'"),
    "a tool schema it cannot compile": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "strin"}}}], "tool_choice": "required"}, "tools", "Invalid type"),
    "a tool message without its call's id": ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0",
                                             "tool_call_id"),
    "content null from a user": ({"messages": [{"role": "user", "content": None}]}, "messages.0",
                                 "content is needed"),
    "tools and a JSON format": ({"tools": [WEATHER], "response_format": {"type": "json_object"}},
                                "response_format", "tool_choice"),
    "ignore_eos under a grammar": ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos",
                                   "ends where its grammar does"),
}


@pytest.mark.parametrize("name", BAD)
def test_each_misuse_is_a_400_naming_the_field(chat_server, name):
    extra, param, words = BAD[name]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, **extra}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param and words in error["message"], error
    assert httpx.get(chat_server.url + "/health").status_code == 200


def test_constrained_and_free_rows_share_a_batch(chat_model):
    """One grammar row beside a free row: both in one batched step, the free row's tokens those it
    draws alone (its seed, its own row), the constrained one's reply JSON that parses."""
    from server.batcher import Batcher, Sequence
    from smolkit.grammar import Constraint, json_grammar
    from smolkit.models import load_model
    model = load_model(str(chat_model["out_dir"] / "ckpt.pt"), None).eval()
    prompt = TOKENIZER.encode(render_chat([{"role": "user", "content": "Say hello."}])).ids

    def run(*constrained):
        batcher = Batcher(model, max_batch=4, cache_bytes=1 << 26)  # its worker thread, as the server runs it
        out, ended = [[] for _ in constrained], threading.Semaphore(0)
        seqs = [Sequence(prompt, 24, lambda t, o=o: ended.release() if t is None else o.append(t), temperature=1.0,
                         seed=7, stop_ids={0, 2}, constraint=Constraint(json_grammar(), TOKENIZER, {0, 2}) if c else None)
                for o, c in zip(out, constrained)]
        batcher.submit(*seqs)  # admitted together, before the first step
        for _ in seqs:
            assert ended.acquire(timeout=120)
        assert not any(isinstance(t, Exception) for o in out for t in o)
        return out, batcher
    (alone,), _ = run(False)
    (free, held), batcher = run(False, True)
    assert batcher.steps == max(len(free), len(held)) - 1  # every step advanced both (the first token: prefill)
    assert free == alone
    text = TOKENIZER.decode([t for t in held if t not in (0, 2)])
    assert text.startswith("{") and held != alone
    if held[-1] in (0, 2):  # the grammar completed: the reply parses
        assert isinstance(json.loads(text), dict)


def test_call_reader_gives_the_same_call_however_the_text_is_cut():
    text = '<tool_call>{"name":"get_weather","arguments":{"city":"Par}is","n":[1,2]}}</tool_call>'
    for size in range(1, len(text) + 1):
        reader, deltas = CallReader(), []
        for i in range(0, len(text), size):
            deltas += reader.push(text[i:i + size], last=i + size >= len(text))
        deltas += reader.push("", last=True)
        calls = [d["tool_calls"][0] for d in deltas]
        assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"] == reader.id
        assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Par}is","n":[1,2]}'
        assert reader.complete and reader.whole()["function"]["arguments"] == '{"city":"Par}is","n":[1,2]}'
    cut = CallReader()  # max_tokens inside the arguments: all of them, the closing never came
    cut.push('<tool_call>{"name":"f","arguments":{"a":"xy')
    assert cut.push("", last=True) == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a":"xy'}}]}]
    assert not cut.complete
    words = CallReader()
    assert words.push("Hello") == [{"content": "Hello"}] and not words.is_call


def test_the_template_renders_tools_as_transformers_does():
    transformers = need_module("transformers", "pip install transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(ROOT, "tokenizer.json"))
    tok.chat_template = CHAT_TEMPLATE
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    chats = [ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "22 C"}],
             [{"role": "system", "content": "Be brief."}] + ASK,
             ASK + [{"role": "assistant", "content": "", "tool_calls": [  # arguments as a dict, as HF allows
                 {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Rome"}}}]}]]
    for messages in chats:
        for tools in (None, [WEATHER, TIME]):
            ours = render_chat(messages, tools=tools)
            assert tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) == ours
    with_tools = render_chat(ASK, tools=[WEATHER])
    assert with_tools.index("<tools>\n" + json.dumps(WEATHER["function"]) + "\n</tools>") < with_tools.index("Paris")


SCHEMA_FILE = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                                "country": {"enum": ["France", "Italy", "Spain"]}},
               "required": ["capital", "country"], "additionalProperties": False}


def test_sample_json_schema_replies_in_the_schema(instruct_dir, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA_FILE))
    proc = subprocess.run(command("sample.py", "--init_from", instruct_dir, "--chat", "--temperature", "0",
                                  "--json_schema", tmp_path / "schema.json", "--device", "cpu"),
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA_FILE)
    proc = subprocess.run(command("sample.py", "--init_from", instruct_dir, "--json", "--start", "Data:",
                                  "--num_samples", "1", "--max_new_tokens", "60", "--temperature", "0",
                                  "--device", "cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("Data:{"), proc.stdout + proc.stderr


SAMPLE_MISTAKES = {  # what --json_schema names -> its message (in-process; the one-line exit: the test below)
    "missing": (None, "--json_schema {path}: cannot read it (No such file or directory)"),
    "not JSON": ("{nope", "--json_schema {path}: not JSON (Expecting property name"),
    "uncompilable": ('{"type": "strin"}', "--json_schema {path}: the grammar library cannot use it: Invalid type: strin"),
}


@pytest.mark.parametrize("name", SAMPLE_MISTAKES)
def test_sample_schema_mistakes_are_named(tmp_path, name):
    import sample
    from smolkit.common import UserError
    content, words = SAMPLE_MISTAKES[name]
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        sample.read_grammar(sample.build_parser().parse_args(["--json_schema", str(path)]))
    assert str(e.value).startswith(words.format(path=path))
    with pytest.raises(UserError, match="--json_schema and --json: give one"):
        sample.read_grammar(sample.build_parser().parse_args(["--json_schema", str(path), "--json"]))


def test_without_llguidance_the_error_names_it(tmp_path):
    (tmp_path / "llguidance.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    proc = subprocess.run(command("sample.py", "--json", "--out_dir", tmp_path / "none"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: structured output needs llguidance: pip install llguidance " \
                          "(pip install -r requirements-serve.txt)\n"
