"""Evaluating through serve.py as lm-evaluation-harness does it: /v1/completions with
token-id prompts, lists of prompts, echo and logprobs (the prompt scored in pieces, in
fp32), the tokenizer routes, every new field bounded and every misuse a 400; then a real
`lm_eval` run against the real server on a task shipped in tests/lm_eval_tasks, which
must give what `lm_eval --model hf` gives on the same weights."""
import glob
import json
import os
import re
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import Server, error_of, need_module
from smolkit.common import ROOT

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def post(server, body, path="/v1/completions"):
    return httpx.post(server.url + path, json=body, timeout=120)


def health(server):
    return httpx.get(server.url + "/health", timeout=30).json()


@pytest.fixture(scope="module")
def reference(chat_model):
    """transformers' LlamaForCausalLM on the chat model's exported weights, fp32."""
    transformers = need_module("transformers", "pip install transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(chat_model["hf"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from smolkit.data import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_pieces_server(chat_model):
    """The chat model with a 64 MiB budget: prompts are scored 14 positions at a time (an
    eighth of 64 MiB over 12 bytes a logit of 49,152: 8,388,608 // 589,824 = 14)."""
    with Server("--init_from", chat_model["hf"], "--dtype", "float32", "--cache_mb", "64") as server:
        yield server


def reference_logprobs(reference, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, and the log-softmax rows (T, V), from transformers."""
    with torch.no_grad():
        lp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[i - 1, t].item() for i, t in enumerate(ids) if i > 0], lp


def test_a_prompt_is_scored_in_pieces_as_transformers_scores_it(small_pieces_server, reference, tokenizer):
    text = "What is the capital of France? Paris. What color is the sky? Blue. " * 4
    ids = tokenizer.encode(text).ids
    assert len(ids) > 3 * 14  # several pieces at 14 positions each
    passes = health(small_pieces_server)["prefill_passes"]
    r = post(small_pieces_server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    # the forward passes that read this prompt: one per piece of 14 positions
    assert health(small_pieces_server)["prefill_passes"] - passes == -(-len(ids) // 14)
    choice = r.json()["choices"][0]
    got = choice["logprobs"]
    assert choice["text"] == text and got["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert len(got["token_logprobs"]) == len(got["top_logprobs"]) == len(ids)  # every token scored
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    want, lp = reference_logprobs(reference, ids)
    assert max(abs(a - b) for a, b in zip(got["token_logprobs"][1:], want)) < 1e-4
    for i, top in enumerate(got["top_logprobs"][1:]):
        values, best = lp[i].topk(3)
        shown = {tokenizer.decode([j], skip_special_tokens=False): v for j, v in zip(best.tolist(), values.tolist())}
        assert set(shown) <= set(top) and len(top) <= 4  # the three likeliest, and the token itself
        assert all(abs(top[k] - v) < 1e-4 for k, v in shown.items())
    # each token's text starts where the one before it ends
    assert got["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_what_lm_eval_reads_a_stop_token_stays_and_greedy_matches_the_top(chat_server, tokenizer):
    from smolkit.chat import render_chat

    # the tiny chat model answers "Paris." and ends its turn with <|im_end|>, a stop id
    prompt = tokenizer.encode(render_chat([{"role": "user", "content": "What is the capital of France?"}])
                              + "Paris.").ids
    r = post(chat_server, {"prompt": [prompt], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
                           "seed": 1234})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][-1] == "<|im_end|>" and choice["finish_reason"] == "stop"
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and not choice["text"].endswith("<|im_end|>")
    # greedy: the generated token's log-probability is the largest of its top ones, bit for bit
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    # and generating several: every greedy token equals its top
    r = post(chat_server, {"prompt": "What is the capital of", "max_tokens": 6, "logprobs": 2, "temperature": 0,
                           "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"], lp["top_logprobs"]))


def test_a_list_of_prompts_gets_one_choice_each_in_order(chat_server, tokenizer):
    prompts = ["What is the capital of France?", "Say hello.", "What color is the sky?"]
    alone = [post(chat_server, {"prompt": p, "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
             for p in prompts]
    for batch in (prompts, [tokenizer.encode(p).ids for p in prompts]):
        r = post(chat_server, {"prompt": batch, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        assert [c["text"] for c in r.json()["choices"]] == alone
    r = post(chat_server, {"prompt": prompts[:1], "max_tokens": 5, "temperature": 0, "echo": True})
    assert r.json()["choices"][0]["text"] == prompts[0] + alone[0]


def test_chat_logprobs_give_each_reply_token_and_its_top(chat_server):
    r = post(chat_server, {"messages": [{"role": "user", "content": "Say hello."}], "logprobs": True,
                           "top_logprobs": 2, "temperature": 0, "max_tokens": 8}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"] == "Hello!"
    for e in content:
        assert bytes(e["bytes"]).decode() == e["token"] and len(e["top_logprobs"]) == 2
        assert e["logprob"] == e["top_logprobs"][0]["logprob"]  # greedy


def test_the_tokenizer_routes_are_the_servers_tokenizer(chat_server, chat_model, tokenizer):
    """/tokenize and /tokenizer_info against transformers' own reader of the exported
    directory (AutoTokenizer) and ChatML written out by hand."""
    import jinja2
    transformers = need_module("transformers", "pip install transformers")
    exported = transformers.AutoTokenizer.from_pretrained(chat_model["hf"])
    text = "Hello world! café 日本語 🎉 def f(x): return x**2"
    r = post(chat_server, {"prompt": text, "add_special_tokens": False}, "/tokenize")
    assert r.json()["tokens"] == tokenizer.encode(text).ids == exported(text, add_special_tokens=False).input_ids
    assert r.json()["count"] == len(r.json()["tokens"])
    assert post(chat_server, {"tokens": r.json()["tokens"]}, "/detokenize").json() == {"prompt": text}
    info = httpx.get(chat_server.url + "/tokenizer_info").json()
    # cosmo2: <|endoftext|> (id 0) is bos, eos and unk, and no bos is added; the context is 8,192
    assert [info[k] for k in ("bos_token", "eos_token", "unk_token")] == \
        [exported.bos_token, exported.eos_token, exported.unk_token] == ["<|endoftext|>"] * 3
    assert exported.convert_tokens_to_ids("<|endoftext|>") == 0 and exported("2024").input_ids == [34, 32, 34, 36]
    assert info["add_bos_token"] is False and info["model_max_length"] == exported.model_max_length == 8192
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    chatml = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chatml
    assert jinja2.Environment().from_string(info["chat_template"]).render(
        messages=messages, add_generation_prompt=True) == chatml


BAD = {  # body (completions unless it has messages) -> (param, words the message must contain)
    "logprobs 21": ({"prompt": "Hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    "top_logprobs 21": ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 21},
                        "top_logprobs", "less than or equal to 20"),
    "top_logprobs alone": ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
                           "top_logprobs", "needs logprobs: true"),
    "suffix": ({"prompt": "Hi", "suffix": "there"}, "suffix", "does not implement it"),
    "best_of 2": ({"prompt": "Hi", "best_of": 2}, "best_of", "does not implement it"),
    "logit_bias": ({"prompt": "Hi", "logit_bias": {"50256": -100}}, "logit_bias", "does not implement it"),
    "presence_penalty": ({"prompt": "Hi", "presence_penalty": 0.5}, "presence_penalty", "does not implement it"),
    "frequency_penalty": ({"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": 1.0},
                          "frequency_penalty", "does not implement"),
    "an unknown field": ({"prompt": "Hi", "guided_regex": "a+"}, "guided_regex", "does not know this field"),
    "n 2": ({"prompt": "Hi", "n": 2}, "n", "less than or equal to 1"),
    "a token id past the vocabulary": ({"prompt": [1, 49152]}, "prompt", "token id 49152 is not in"),
    "a negative token id": ({"prompt": [[1, -1]]}, "prompt", "token ids are 0 or more"),
    "an empty list": ({"prompt": []}, "prompt", "never an empty list"),
    "an empty prompt in a list": ({"prompt": [[1], []]}, "prompt", "never an empty list"),
    "65 prompts": ({"prompt": ["Hi"] * 65}, "prompt", "at most 64"),
    "a mixed list": ({"prompt": ["Hi", 1]}, "prompt", "prompt: Input should be a valid string"),
    "stream with echo": ({"prompt": "Hi", "stream": True, "echo": True}, "stream", "without echo or logprobs"),
    "stream with two prompts": ({"prompt": ["a", "b"], "stream": True}, "stream", "one prompt"),
    "chat max_tokens 0": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens",
                          "greater than or equal to 1"),
    "ids longer than the context": ({"prompt": [1] * 8193}, "prompt", "maximum context length is 8192"),
    "detokenize past the vocabulary": ({"tokens": [0, 10 ** 6]}, "tokens", "not in this model's vocabulary"),
}


@pytest.mark.parametrize("name", BAD)
def test_each_misuse_of_the_new_fields_is_a_400_naming_it(chat_server, name):
    body, param, words = BAD[name]
    path = "/v1/chat/completions" if "messages" in body else "/detokenize" if "tokens" in body else "/v1/completions"
    r = post(chat_server, {**body, **({"max_tokens": 1} if "max_tokens" not in body and path != "/detokenize"
                                      else {})}, path)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param and words in error["message"], error


def test_more_than_four_stop_strings_are_taken(chat_server):
    # the tiny chat model's greedy answer is "Paris."; the eighth of eight stop strings cuts it
    from smolkit.chat import render_chat
    prompt = render_chat([{"role": "user", "content": "What is the capital of France?"}])
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    whole = post(chat_server, body).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == ("Paris.", "stop")  # ended by <|im_end|>
    stops = ["Rome", "Blue", "Four", "Hello", "qq", "zz", "##", "is."]
    r = post(chat_server, {**body, "stop": stops, "ignore_eos": True})
    assert r.status_code == 200, r.text
    cut = r.json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == ("Par", "stop")


def test_lm_eval_through_the_server_gives_what_its_transformers_backend_gives(instruct_dir, tmp_path):
    """The real harness, both ways, on the official instruct weights in fp32: the same
    accuracy, per-choice log-likelihoods within 1e-3, greedy flags and generated text."""
    need_module("lm_eval", "pip install 'lm-eval[api]'")
    tasks = ["--tasks", "smol_mc,smol_gen", "--include_path", os.path.join(ROOT, "tests", "lm_eval_tasks"),
             "--batch_size", "1", "--log_samples"]
    with Server("--init_from", instruct_dir, "--dtype", "float32") as server:
        runs = {
            "hf": ["--model", "hf", "--model_args", f"pretrained={instruct_dir},dtype=float32", "--device", "cpu"],
            "server": ["--model", "local-completions", "--model_args",
                       f"base_url={server.url}/v1/completions,model=SmolLM2-135M-Instruct,tokenized_requests=True"]}
        # one after the other: on a small CPU, two runs at once only fight over its cores
        logs = {name: subprocess.run([sys.executable, "-m", "lm_eval", *args, *tasks, "--output_path", tmp_path / name],
                                     cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=400)
                for name, args in runs.items()}
    for name, proc in logs.items():
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Using remote tokenizer" in logs["server"].stderr + logs["server"].stdout  # none needed locally

    def samples(name, task):
        [path] = glob.glob(str(tmp_path / name / "*" / f"samples_{task}_*.jsonl"))
        with open(path) as f:
            return {s["doc_id"]: s for s in map(json.loads, f)}

    def results(name):
        [path] = glob.glob(str(tmp_path / name / "*" / "results_*.json"))
        with open(path) as f:
            return json.load(f)["results"]

    hf, ours = samples("hf", "smol_mc"), samples("server", "smol_mc")
    assert sorted(hf) == sorted(ours) == list(range(12))
    greedy = []
    for doc in hf:
        for (want,), (got,) in zip(hf[doc]["resps"], ours[doc]["resps"]):
            assert abs(float(want[0]) - float(got[0])) < 1e-3, (doc, want, got)
            assert want[1] == got[1], (doc, want, got)
            greedy.append(want[1])
    assert "True" in greedy and "False" in greedy  # the greedy check was really exercised both ways
    hf_gen, our_gen = samples("hf", "smol_gen"), samples("server", "smol_gen")
    assert [hf_gen[d]["resps"] for d in sorted(hf_gen)] == [our_gen[d]["resps"] for d in sorted(our_gen)]
    assert sum(bool(r[0][0].strip()) for r in (s["resps"] for s in our_gen.values())) >= 4  # real answers
    for task, metrics in (("smol_mc", ("acc,none", "acc_norm,none")), ("smol_gen", ("exact_match,none",))):
        for metric in metrics:
            assert results("hf")[task][metric] == results("server")[task][metric], (task, metric)


def test_lm_eval_through_a_server_with_an_api_key(chat_model, tmp_path):
    """--api_key guards the tokenizer routes too: lm_eval sends the key to the completions
    as OPENAI_API_KEY and to the tokenizer routes as auth_token, as docs/evaluate.md says.
    Without auth_token the tokenizer routes answer 401: told to use the remote tokenizer
    (tokenizer_backend=remote), lm_eval fails naming the 401."""
    need_module("lm_eval", "pip install 'lm-eval[api]'")

    def lm_eval(server, model_args):
        return subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"base_url={server.url}/v1/completions,model=hf,tokenized_requests=True{model_args}",
             "--tasks", "smol_mc", "--include_path", os.path.join(ROOT, "tests", "lm_eval_tasks"), "--limit", "2",
             "--output_path", tmp_path], cwd=ROOT, env={**OFFLINE, "OPENAI_API_KEY": "sesame"},
            capture_output=True, text=True, timeout=400)
    with Server("--init_from", chat_model["hf"], "--dtype", "float32", "--api_key", "sesame") as server:
        proc = lm_eval(server, ",auth_token=sesame")
        without = lm_eval(server, ",tokenizer_backend=remote")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Using remote tokenizer" in out, out[-3000:]
    assert re.search(r"\|\s*smol_mc\s*\|", proc.stdout), out[-3000:]  # its row of the results table
    said = without.stdout + without.stderr
    assert without.returncode != 0 and not re.search(r"\|\s*smol_mc\s*\|", without.stdout), said[-3000:]
    assert "/tokenizer_info failed after 3 attempts: 401 Client Error: Unauthorized" in said, said[-3000:]
