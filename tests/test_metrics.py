"""metrics.py's log lines on a controlled clock: the ETA counts the evaluations still to
come (first guessed from the step time, then as measured), and an evaluation expected to
take more than a few seconds announces itself when it starts."""
import json
import types

from smolkit import metrics
from smolkit.metrics import RunFacts, TrainingLog
from train import TrainConfig


def test_eta_counts_the_evaluations_to_come_and_a_long_evaluation_says_so(tmp_path, monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=lambda: now[0]))
    cfg = TrainConfig(out_dir=str(tmp_path), max_iters=10, eval_interval=5, eval_iters=20, batch_size=4, log_interval=1)
    log = TrainingLog(cfg, RunFacts(master=True, resumed_at=None, tokens_per_step=100))

    def step(n, seconds=3.0):
        now[0] += seconds
        log.step(n, loss=1.0, lr=1e-3)
        return capsys.readouterr().out.strip().splitlines()[-1]
    for n in range(1, 5):
        step(n)
    # at 3 s a step, 5 steps left and 2 evaluations (steps 5 and 10) guessed at 2 x 20
    # forward passes = 40/3 steps = 40 s each: 15 + 80 s
    assert step(5).endswith("eta 1m35s")
    log.eval_started(5)
    assert capsys.readouterr().out.strip() == "evaluating at step 5: 2 x 20 batches of 4 sequences, about 0m40s"
    now[0] += 100.0  # the evaluation took 100 s
    log.saved("ckpt.pt", 5, "")
    capsys.readouterr()
    assert step(6).endswith("eta 1m52s")  # 4 steps (12 s) and the final evaluation, now measured: 100 s
    for n in range(7, 10):
        step(n)
    assert step(10).endswith("eta 1m40s")  # no step left, but the last evaluation still to come
    log.eval_started(10)
    assert capsys.readouterr().out.strip() == "evaluating at step 10: 2 x 20 batches of 4 sequences, about 1m40s"
    log.close()


def test_a_short_evaluation_is_not_announced(tmp_path, capsys):
    cfg = TrainConfig(out_dir=str(tmp_path), max_iters=10, eval_interval=5, eval_iters=1, batch_size=4, log_interval=1)
    log = TrainingLog(cfg, RunFacts(master=True, resumed_at=None, tokens_per_step=100))
    log.step(1, loss=1.0, lr=1e-3)
    capsys.readouterr()
    log.eval_started(5)  # a step of milliseconds: an evaluation of milliseconds, nothing to say
    assert capsys.readouterr().out == ""
    log.close()


def test_mfu_where_the_peak_is_known_is_in_the_line_and_the_row(tmp_path, monkeypatch, capsys):
    # on a GPU that common.PEAK_FLOPS names: MFU = peak_share x tok/s, shown in the step line and
    # written to metrics.jsonl (and so sent to --log_to's trackers as train/mfu)
    now = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=lambda: now[0]))
    cfg = TrainConfig(out_dir=str(tmp_path), max_iters=10, eval_interval=5, log_interval=1)
    log = TrainingLog(cfg, RunFacts(master=True, resumed_at=None, tokens_per_step=1000, peak_share=2 ** -12))
    now[0] += 2.0  # 500 tok/s: MFU 500 / 4,096
    log.step(1, loss=1.0, lr=1e-3)
    log.close()
    assert " | mfu 12.2% | " in capsys.readouterr().out
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row == {"step": 1, "loss": 1.0, "lr": 1e-3, "tok_s": 500.0, "mfu": 500 / 4096}
