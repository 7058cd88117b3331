"""Fine-tuning on conversations: what is rendered, what is learned (the mask), how rows
are cut and shared, prepare.py's files, and train.py end to end on a tiny model."""
import json
import math
import os
import random
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import QA, command, on_cpu
from smol import IM_END_ID, SmolConfig, SmolLM
from smolkit.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from smolkit.common import ROOT, UserError
from smolkit.conversations import check_messages, encode, encode_all, load_conversations, read_conversations
from smolkit.data import jsonl_records, load_tokenizer
from smolkit.samplers import ConversationSampler, fit, pack

TOKENIZER = load_tokenizer()
CONVERSATIONS = [
    [{"role": "user", "content": "Hi! Who are you?"}, {"role": "assistant", "content": "A small model."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And goodbye?"},
     {"role": "assistant", "content": " Au revoir."}],
    [{"role": "user", "content": "Two\nlines"}, {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_is_chat_templates_token_for_token(messages):
    ids, _ = encode(messages, TOKENIZER)
    assert ids.tolist() == TOKENIZER.encode(render_chat(messages, add_generation_prompt=False)).ids
    if messages[0]["role"] != "system":  # the default system prompt, as at inference
        assert DEFAULT_SYSTEM_PROMPT in TOKENIZER.decode(ids.tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_targets_are_the_assistants_words_and_their_im_end(messages):
    ids, targets = encode(messages, TOKENIZER)
    said = TOKENIZER.decode(ids[targets].tolist(), skip_special_tokens=False)
    assert said == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    # every <|im_end|> closing an assistant turn is a target, no other one is
    ends = np.flatnonzero(ids == IM_END_ID)
    roles = (["system"] if messages[0]["role"] != "system" else []) + [m["role"] for m in messages]
    assert [bool(targets[i]) for i in ends] == [r == "assistant" for r in roles]
    # the header that opens the assistant's turn is not
    header = TOKENIZER.encode("<|im_start|>assistant\n").ids
    for start in np.flatnonzero(ids == header[0]):
        assert not targets[start:start + len(header)].any()


def test_content_parts_are_joined_as_serve_py_joins_them():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
                           {"role": "assistant", "content": "Hi"}]}
    assert check_messages(record, "x")[0]["content"] == "Hello"


def tiny():
    torch.manual_seed(0)
    return SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128))


def test_the_loss_reads_only_the_assistants_tokens_of_one_conversation_a_row():
    data = encode_all(CONVERSATIONS * 3, TOKENIZER)
    sampler = ConversationSampler(data, 128, 3, "cpu", seed=0)
    x, y = next(sampler.eval_batches("train", 1))  # rows: the first three conversations
    model = tiny()
    logits, _ = model(x)
    for r, messages in enumerate(CONVERSATIONS):
        ids, targets = encode(messages, TOKENIZER)
        n = len(ids) - 1
        assert x[r, :n].tolist() == ids[:-1].tolist() and (x[r, n:] == 0).all()  # this conversation, then padding
        assert (y[r, n:] == -1).all()  # nothing of the padding (nor of another conversation) is learned
        assert y[r, :n][targets[1:]].tolist() == ids[1:][targets[1:]].tolist()
        assert (y[r, :n][~targets[1:]] == -1).all()
    # the loss: the mean cross-entropy over the assistant's tokens, computed from all the logits
    mask = y != -1
    by_hand = F.cross_entropy(logits[mask].float(), y[mask])
    torch.testing.assert_close(model(x, y)[1], by_hand)
    # nothing outside the assistant's targets is learned: the loss's gradient with respect to
    # the logits the loss computes (caught as the loss makes them) is exactly zero at every
    # other position (the prompt, the padding), and not zero at any target
    logits_of_loss = KeepLogits(model.config.vocab_size)
    with logits_of_loss:
        loss = model(x, y)[1]
    loss.backward()
    [kept] = logits_of_loss.kept
    grad = kept.grad.view(*y.shape, -1)  # (B, T, V)
    assert (grad[~mask] == 0).all()
    assert (grad[mask].abs().amax(dim=-1) > 0).all()


class KeepLogits(torch.overrides.TorchFunctionMode):
    """Keeps every (N, V) output of F.linear made inside it, its gradient retained: the
    logits the loss computes from the final features and the tied head."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.kept = vocab_size, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and out.size(-1) == self.vocab_size and out.requires_grad:
            out.retain_grad()
            self.kept.append(out)
        return out


def test_a_batch_without_targets_has_loss_zero_not_nan():
    x = torch.zeros(2, 8, dtype=torch.long)
    assert tiny()(x, torch.full((2, 8), -1))[1].item() == 0.0


def test_long_conversations_lose_their_trailing_turns_or_are_dropped():
    two_turns = CONVERSATIONS[1]
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}]
    ids, targets, bounds = encode_all([two_turns, short], TOKENIZER)
    first_reply_end = int(np.flatnonzero((ids == IM_END_ID) & targets)[0]) + 1
    other = int(bounds[2] - bounds[1])  # the one-turn conversation's length
    length = max(first_reply_end, other) + 1
    assert length < bounds[1]  # the two-turn one does not fit whole
    spans, cut, dropped = fit(ids, targets, bounds, length)
    assert spans == [(0, first_reply_end), (int(bounds[1]), int(bounds[2]))] and (cut, dropped) == (1, 0)
    spans, cut, dropped = fit(ids, targets, bounds, first_reply_end - 1)
    assert other <= first_reply_end - 1
    assert (cut, dropped) == (0, 1) and spans == [(int(bounds[1]), int(bounds[2]))]  # the first reply does not fit


def test_each_target_weighs_the_same_whichever_micro_batch_holds_it():
    data = encode_all(CONVERSATIONS * 10, TOKENIZER)
    sampler = ConversationSampler(data, 128, 2, "cpu", seed=3, share=(0, 1, 3))
    total = 0.0
    for _ in range(3):
        x, y, weight = sampler.next()
        assert weight == pytest.approx((y != -1).sum().item() / sampler.step_weight)
        total += weight
    assert total == pytest.approx(1.0)


def test_every_conversation_is_drawn_once_per_pass():
    data = encode_all([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                       for i in range(19)], TOKENIZER)
    sampler = ConversationSampler(data, 64, 19, "cpu", seed=5)
    firsts = [sorted(map(tuple, sampler.next()[0].tolist())) for _ in range(2)]
    assert firsts[0] == firsts[1] and len(set(firsts[0])) == 19  # the same 19 rows in each pass


@pytest.mark.parametrize("line, message", [
    ("not json", "chats.jsonl line 2 is not JSON"),
    ('{"text": "hi"}', 'chats.jsonl line 2 has no "messages"'),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "chats.jsonl line 2, message 1: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": ""}]}', "message 1 (user): content must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": 3}]}', "message 1 (user): content must be a non-empty string"),
    ('{"messages": []}', 'chats.jsonl line 2: "messages" must be a non-empty list')])
def test_a_bad_line_is_named(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    + line + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_conversations(str(path))


def test_a_file_reads_as_editors_write_it(tmp_path):
    # a byte-order mark (Notepad's "UTF-8 with BOM"), CRLF line ends and blank lines: the same
    # conversations as the plain file, in fine-tuning and in tools.prepare alike (one reader)
    lines = [json.dumps({"messages": c}) for c in CONVERSATIONS]
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "windows.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode() + b"\r\n\r\n")
    assert read_conversations(str(tmp_path / "windows.jsonl")) == read_conversations(str(tmp_path / "plain.jsonl"))
    assert [r for r, _ in jsonl_records(str(tmp_path / "windows.jsonl"))] == [{"messages": c} for c in CONVERSATIONS]


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(json.dumps({"messages": CONVERSATIONS[0]}).encode() + b"\n{\"caf\xe9\": 1}\n")  # Latin-1
    with pytest.raises(UserError) as e:
        read_conversations(str(path))
    assert str(e.value) == f"{path} line 2 is not UTF-8 text (byte 6 of the line); convert it first"


def test_a_file_without_an_assistant_turn_is_refused(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(UserError, match="has no assistant turn"):
        load_conversations(str(path), TOKENIZER)


def test_prepare_writes_what_train_reads(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    proc = subprocess.run([*command("tools.prepare"), path, "--out", tmp_path / "prepared"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 conversations" in proc.stdout
    read = load_conversations(str(tmp_path / "prepared"), TOKENIZER)
    for a, b in zip(read, encode_all(CONVERSATIONS, TOKENIZER)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_prepare_reads_a_parquet_messages_column(tmp_path):
    from conftest import need_module
    need_module("pyarrow", "pip install pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"messages": CONVERSATIONS, "id": [1, 2, 3]}), tmp_path / "chats.parquet")
    proc = subprocess.run([*command("tools.prepare"), tmp_path / "chats.parquet", "--out",
                           tmp_path / "prepared"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    read = load_conversations(str(tmp_path / "prepared"), TOKENIZER)
    for a, b in zip(read, encode_all(CONVERSATIONS, TOKENIZER)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "64", "--batch_size", "8", "--eval_iters", "1", "--sample_tokens", "4", "--log_interval", "1"]


def run(script, *args, cwd):
    proc = subprocess.run(command(script, *on_cpu(args)), capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_fine_tuning_resumes_exactly_and_teaches_the_end_of_a_turn(tmp_path):
    # a tiny model pretrained a few steps on text (it knows no ChatML), then fine-tuned from
    # its ckpt.pt on conversations: straight, and split by a resume
    rng = random.Random(0)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for _ in range(200):
            messages = []
            for question, answer in rng.sample(QA, rng.choice([1, 1, 2])):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    run("train.py", *TINY, "--max_iters", 4, "--eval_interval", 4, "--data", os.path.join(ROOT, "input.txt"),
        "--out_dir", "base", cwd=tmp_path)
    tune = ["--init_from", "base/ckpt.pt", "--data", "qa.jsonl", "--learning_rate", "1e-2", "--min_lr", "1e-3",
            "--eval_interval", 25, *TINY[-8:]]
    straight = run("train.py", *tune, "--max_iters", 50, "--out_dir", "straight", cwd=tmp_path)
    # the settings in effect: the fine-tuning defaults, but for the flags given (max_iters: no passes)
    assert "fine-tuning from base/ckpt.pt on conversations, 50 steps; settings for fine-tuning (their defaults " \
           "unless given): learning_rate 0.01, min_lr 0.001, warmup_iters 0, weight_decay 0.0, epochs 0.0, " \
           "batch_size 8, eval_interval 25, sample_prompt Who are you?, sample_tokens 4\n" in straight.stdout
    assert "190 train / 10 val conversations, packed into rows of up to 2,048 tokens;" in straight.stdout
    run("train.py", *tune, "--max_iters", 25, "--out_dir", "split", cwd=tmp_path)
    resumed = run("train.py", "--init_from", "resume", "--max_iters", 50, "--out_dir", "split", cwd=tmp_path)
    assert "step 26 |" in resumed.stdout and "step 25 |" not in resumed.stdout
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["eos_token_ids"] == [0, 2]  # <|im_end|> added: a chat model now
    chat = subprocess.run([*command("sample.py"), "--out_dir", tmp_path / "split", "--chat",
                           "--temperature", "0", "--verbose", "--max_new_tokens", "40", "--device", "cpu"],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout == "Paris.\n", chat.stdout + chat.stderr
    assert "not trained for chat" not in chat.stderr
    # the reply's tokens and the <|im_end|> that ended it, nothing more
    assert f" {len(TOKENIZER.encode('Paris.').ids) + 1} new tokens" in chat.stderr


def test_fine_tuning_defaults_apply_to_a_trained_model_on_conversations(tmp_path):
    import train
    from smolkit.hf import save_pretrained
    save_pretrained(tiny(), tmp_path / "model")
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    cfg, mcfg, _, _ = train.resolve_settings({"init_from": str(tmp_path / "model"), "data": str(tmp_path / "chats.jsonl")})
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.weight_decay, cfg.epochs, cfg.batch_size,
            cfg.eval_interval) == (1e-4, 1e-5, 0, 0.0, 3.0, 8, 50)
    assert mcfg.block_size == mcfg.max_position_embeddings  # the model's whole context
    given = train.resolve_settings({"init_from": str(tmp_path / "model"), "data": str(tmp_path / "chats.jsonl"),
                                    "learning_rate": 3e-4, "max_iters": 7})[0]
    assert (given.learning_rate, given.max_iters, given.epochs) == (3e-4, 7, 0.0)  # flags given win
    text = train.resolve_settings({"init_from": str(tmp_path / "model")})[0]  # text data: pretraining's defaults
    assert (text.learning_rate, text.epochs) == (6e-4, 0.0)


def test_pack_fills_rows_best_fit_in_decreasing_length():
    # worked by hand: 5 opens a row (2 left), 4 opens another (3 left), 3 fills it exactly,
    # 2 takes the first row's last 2
    assert pack([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack([9, 1], 7) == [[0], [1]]  # longer than a row: a row of its own
    lengths = [random.Random(i).randint(1, 300) for i in range(100)]
    rows = pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(100))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 512) + 1  # within a row of the least possible here


def packed_batch(pack_len):
    data = encode_all(CONVERSATIONS * 3, TOKENIZER)
    sampler = ConversationSampler(data, 256, 9, "cpu", seed=0, pack_len=pack_len)
    return sampler, sampler.splits["train"][:9]


def test_a_packed_row_scores_each_conversation_as_if_alone():
    model = tiny()
    sampler, spans = packed_batch(512)
    alone, _ = packed_batch(None)  # one conversation a row
    (x, pos), y = sampler.batch(spans)
    assert x.shape[0] == 1 and pos[0, 0] == 0  # 9 short conversations, one row
    with torch.no_grad():
        packed_logits = model(x, input_pos=pos)[0]
        packed_sum = model(x, y, input_pos=pos)[1] * (y != -1).sum()
        alone_sum, at = 0.0, 0
        (order,) = pack([b - a - 1 for a, b in spans], 512)  # the row: longest conversation first
        for a, b in (spans[i] for i in order):
            xa, ya = alone.batch([(a, b)])
            n = b - a - 1
            torch.testing.assert_close(packed_logits[0, at:at + n], model(xa[:, :n])[0][0], atol=1e-5, rtol=1e-5)
            alone_sum = alone_sum + model(xa, ya)[1] * (ya != -1).sum()
            at += n
    torch.testing.assert_close(packed_sum, alone_sum, atol=1e-5, rtol=1e-5)
    # the padding after the last conversation is never a target
    assert (y[0, at:] == -1).all() and int((y != -1).sum()) == sampler.weight_of(spans)


def test_flex_attention_gives_the_dense_masks_logits():
    model = tiny()
    sampler, spans = packed_batch(200)  # several rows
    (x, pos), _ = sampler.batch(spans)
    assert x.shape[0] > 1
    with torch.no_grad(), pytest.warns(UserWarning):  # eager flex attention: slow but the same sums
        dense = model(x, input_pos=pos)[0]
        model.flex_attention = True
        flex = model(x, input_pos=pos)[0]
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_doc_mask_keeps_each_document_of_a_window_to_itself():
    from smol import EOT_ID
    from smolkit.samplers import BatchSampler, document_positions
    a, b = [5, 6, 7, EOT_ID], [8, 9, 10, 11, 12]
    x = torch.tensor([a + b, [3] + b + [EOT_ID, 4, 4]])
    assert document_positions(x).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 0, 1]]
    model = tiny()
    with torch.no_grad():  # the second document's logits are its own, as if alone
        torch.testing.assert_close(model(x[:1], input_pos=document_positions(x[:1]))[0][0, 4:],
                                   model(torch.tensor([b]))[0][0], atol=1e-5, rtol=1e-5)
    data = np.array((a + b) * 20, dtype=np.uint16)
    on, off = (BatchSampler({"train": data, "val": data}, 16, 2, "cpu", 0, doc_mask=m) for m in (True, False))
    (x_on, pos), y_on = on.next()[:2]
    x_off, y_off = off.next()[:2]
    assert torch.equal(x_on, x_off) and torch.equal(y_on, y_off) and torch.equal(pos, document_positions(x_on))


def test_compiled_flex_attention_gives_the_dense_masks_logits():
    # the graph CUDA compiles for packed rows, block mask built inside it; a CPU runs its
    # forward (torch has no flex attention backward on a CPU: the training step is GPU-only)
    model = tiny().eval()
    sampler, spans = packed_batch(200)
    (x, pos), _ = sampler.batch(spans)
    with torch.no_grad():
        dense = model(x, input_pos=pos)[0]
        model.flex_attention = True
        flex = torch.compile(model)(x, input_pos=pos)[0]
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
