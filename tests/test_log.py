"""The run log: console lines, metrics.jsonl, TensorBoard, the report and the matmul peak."""

import json

import pytest

from hanlm.config import LogConfig
from hanlm.errors import DataError
from hanlm.log import RunLogger, measure_matmul_peak, read_metrics

PEAK = 1e12


def log_steps(logger: RunLogger, first: int, last: int) -> None:
    """Train steps first..last with made-up but step-determined numbers; an eval every 10 steps."""
    for step in range(first, last + 1):
        logger.train_step(step, loss=5.0 - 0.1 * step, lr=1e-3 * step / 25, grad_norm=0.5 + step / 100,
                          tokens_seen=1000 * step, tokens_per_s=3412.0 + step, flops_per_s=0.612 * PEAK,
                          memory_bytes=1_230_000_000)
        if step % 10 == 0:
            logger.eval(step, 1000 * step, {"loss": 4.0 - 0.1 * step, "bpc": 4.63 - step / 100,
                                            "ppl_char": 24.8, "ppl_token": 30.1})


def kinds_and_steps(records):
    return [(r["kind"], r["step"]) for r in records]


def test_records_come_every_n_steps_at_step_one_and_at_the_last_step(tmp_path, capsys):
    with RunLogger(tmp_path, LogConfig(every_steps=10, progress=False, tensorboard=False),
                   total_steps=25, peak_flops=PEAK) as logger:
        log_steps(logger, 1, 25)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert kinds_and_steps(records) == [("start", 0), ("train", 1), ("train", 10), ("eval", 10),
                                        ("train", 20), ("eval", 20), ("train", 25)]
    train10 = records[2]
    assert train10["tokens"] == 10_000
    assert train10["loss"] == pytest.approx(4.0)
    assert train10["lr"] == pytest.approx(4e-4)
    assert train10["grad_norm"] == pytest.approx(0.6)
    assert train10["tokens_per_s"] == 3422.0
    assert train10["mfu"] == pytest.approx(0.612)
    assert train10["memory_bytes"] == 1_230_000_000
    assert train10["time"] > 1.7e9
    assert records[3] == {"kind": "eval", "step": 10, "tokens": 10_000, "loss": pytest.approx(3.0),
                          "bpc": pytest.approx(4.53), "ppl_char": 24.8, "ppl_token": 30.1,
                          "time": records[3]["time"]}

    out = capsys.readouterr().out.splitlines()
    assert "step 10/25 | loss 4.0000 | lr 4.00e-04 | grad 0.600 | 3,422 tok/s | MFU 61.2% | mem 1.23 GB" in out
    assert "step  1/25 | loss 4.9000 | lr 4.00e-05 | grad 0.510 | 3,413 tok/s | MFU 61.2% | mem 1.23 GB" in out
    assert "eval step 20 | val loss 2.0000 | bpc 4.430 | ppl/char 24.8 | ppl/token 30.1" in out
    assert len(out) == 6  # 4 train lines, 2 eval lines: nothing printed between logging steps


def test_console_line_leaves_out_mfu_and_memory_when_unknown(tmp_path, capsys):
    with RunLogger(tmp_path, LogConfig(progress=False, tensorboard=False), total_steps=2000) as logger:
        logger.train_step(1, loss=4.1234, lr=9.8e-4, grad_norm=0.812, tokens_seen=64, tokens_per_s=3412.4,
                          flops_per_s=1e12)
    assert capsys.readouterr().out == "step    1/2000 | loss 4.1234 | lr 9.80e-04 | grad 0.812 | 3,412 tok/s\n"
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["mfu"] is None


def test_resumed_run_appends_to_the_same_metrics_file(tmp_path):
    cfg = LogConfig(every_steps=10, progress=False, tensorboard=False)
    with RunLogger(tmp_path, cfg, total_steps=40) as logger:
        log_steps(logger, 1, 20)
    with RunLogger(tmp_path, cfg, total_steps=40, start_step=20) as logger:
        log_steps(logger, 21, 30)
    assert kinds_and_steps(read_metrics(tmp_path / "metrics.jsonl")) == [
        ("start", 0), ("train", 1), ("train", 10), ("eval", 10), ("train", 20), ("eval", 20),
        ("start", 20), ("train", 30), ("eval", 30)]


def test_resume_after_a_crash_mid_write_keeps_every_later_record(tmp_path):
    cfg = LogConfig(every_steps=10, progress=False, tensorboard=False)
    with RunLogger(tmp_path, cfg, total_steps=40) as logger:
        log_steps(logger, 1, 10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # the crash
    with RunLogger(tmp_path, cfg, total_steps=40, start_step=10) as logger:
        log_steps(logger, 11, 20)
    assert kinds_and_steps(read_metrics(tmp_path / "metrics.jsonl"))[-3:] == [
        ("start", 10), ("train", 20), ("eval", 20)]


def test_tensorboard_holds_the_train_and_val_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, LogConfig(every_steps=10, progress=False), total_steps=25,
                   peak_flops=PEAK) as logger:
        log_steps(logger, 1, 25)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 10, 20, 25]
    assert [v for _, v in loss] == pytest.approx([4.9, 4.0, 3.0, 2.5])
    assert [e.value for e in events.Scalars("train/tokens_seen")] == [1000, 10_000, 20_000, 25_000]
    assert events.Scalars("train/mfu")[0].value == pytest.approx(0.612)
    assert [e.value for e in events.Scalars("val/bpc")] == pytest.approx([4.53, 4.43])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(events.Tags()["scalars"])


def test_tensorboard_after_resume_shows_the_resumed_runs_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LogConfig(every_steps=10, progress=False)
    with RunLogger(tmp_path, cfg, total_steps=40) as logger:
        for step in range(1, 31):
            logger.train_step(step, loss=5.0, lr=1e-3, grad_norm=1.0, tokens_seen=step, tokens_per_s=1.0)
    with RunLogger(tmp_path, cfg, total_steps=40, start_step=10) as logger:  # steps 20, 30 run again
        for step in range(11, 41):
            logger.train_step(step, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_seen=step, tokens_per_s=1.0)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.0), (10, 5.0), (20, 1.0),
                                                                         (30, 1.0), (40, 1.0)]


def test_report_summarises_the_whole_resumed_run_with_plot_and_sections(tmp_path):
    cfg = LogConfig(every_steps=10, progress=False, tensorboard=False)
    with RunLogger(tmp_path, cfg, total_steps=30, peak_flops=PEAK) as logger:
        log_steps(logger, 1, 20)
    # Resume from a checkpoint at step 10: the first run's steps 11..20 are superseded.
    with RunLogger(tmp_path, cfg, total_steps=30, start_step=10, peak_flops=PEAK) as logger:
        for step in range(11, 31):
            logger.train_step(step, loss=1.0 + step / 1000, lr=1e-3, grad_norm=1.0, tokens_seen=1000 * step,
                              tokens_per_s=1000.0, flops_per_s=0.5 * PEAK)
        logger.eval(30, 30_000, {"loss": 2.5, "bpc": 4.5})
        path = logger.write_report("Run tiny", {"Samples": "人民日报", "Config": "```yaml\nlr: 0.001\n```"})

    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Run tiny\n")
    assert "| final step | 30 |" in text
    assert "| tokens seen | 30,000 |" in text
    assert "| final train loss | 1.0300 |" in text
    # The superseded eval at step 20 (loss 2.0, bpc 4.43) would be the best; step 10's (3.0, 4.53) is kept.
    assert "| best val loss | 2.5000 |" in text and "| final val loss | 2.5000 |" in text
    assert "| best val bpc | 4.500 |" in text and "| final val bpc | 4.500 |" in text
    # Kept train records: step 1 and 10 of the first run (3413, 3422 tok/s at 61.2%), 20 and 30 of the second.
    assert "| mean tokens/s | 2,209 |" in text
    assert "| mean MFU | 55.6% |" in text
    assert "![loss](loss.png)" in text
    assert text.index("## Samples\n\n人民日报") < text.index("## Config\n\n```yaml\nlr: 0.001\n```")

    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_without_evals_plots_train_loss_only(tmp_path):
    with RunLogger(tmp_path, LogConfig(progress=False, tensorboard=False), total_steps=5) as logger:
        for step in range(1, 6):
            logger.train_step(step, loss=3.0, lr=1e-3, grad_norm=1.0, tokens_seen=step, tokens_per_s=10.0)
        text = logger.write_report("No eval").read_text(encoding="utf-8")
    assert "| final train loss | 3.0000 |" in text and "val loss" not in text and "MFU" not in text
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_report_of_an_empty_run_says_no_steps_were_logged(tmp_path):
    with RunLogger(tmp_path, LogConfig(progress=False, tensorboard=False), total_steps=5) as logger:
        text = logger.write_report("Empty", {"Config": "x: 1"}).read_text(encoding="utf-8")
    assert "No steps were logged." in text and "## Config" in text
    assert not (tmp_path / "loss.png").exists()


def test_disabled_logger_writes_no_files_and_prints_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, LogConfig(every_steps=1), total_steps=25, enabled=False) as logger:
        log_steps(logger, 1, 25)
        logger.message("hello")
        logger.write_report("Disabled", {"Config": "x: 1"})
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_progress_bar_shows_step_and_loss_without_breaking_console_lines(tmp_path, capsys):
    with RunLogger(tmp_path, LogConfig(every_steps=10, tensorboard=False), total_steps=40,
                   start_step=20) as logger:
        log_steps(logger, 21, 30)
        logger.message("saved checkpoint")
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "step 30/40 | loss 2.0000 | lr 1.20e-03 | grad 0.800 | 3,442 tok/s | mem 1.23 GB",
        "eval step 30 | val loss 1.0000 | bpc 4.330 | ppl/char 24.8 | ppl/token 30.1",
        "saved checkpoint"]
    assert "30/40" in captured.err and "loss 2.0000" in captured.err and "3,442 tok/s" in captured.err


def test_close_twice_is_harmless(tmp_path):
    logger = RunLogger(tmp_path, LogConfig(progress=False), total_steps=5)
    logger.close()
    logger.close()
    logger.train_step(1, loss=1.0, lr=1.0, grad_norm=1.0, tokens_seen=1, tokens_per_s=1.0)
    assert kinds_and_steps(read_metrics(tmp_path / "metrics.jsonl")) == [("start", 0)]


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n" + '{"kind": "train", "st')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]


def test_read_metrics_rejects_a_corrupt_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "tr\n' + json.dumps({"kind": "train", "step": 1}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        read_metrics(path)


def test_matmul_peak_on_cpu_is_plausible():
    peak = measure_matmul_peak("cpu", seconds=0.2)
    print(f"CPU fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    assert 1e9 < peak < 1e13


def test_a_run_with_a_time_budget_shows_the_steps_its_time_allows(tmp_path, capsys, monkeypatch):
    import time as real_time

    import hanlm.log as log

    class Clock:  # ten seconds per step, whatever the machine's speed
        now = 0.0
        time = staticmethod(real_time.time)

        @classmethod
        def monotonic(cls):
            return cls.now

    monkeypatch.setattr(log, "time", Clock)
    with RunLogger(tmp_path, LogConfig(every_steps=10, progress=False, tensorboard=False), total_steps=100_000,
                   seconds=1000.0) as logger:
        for step in range(1, 21):
            Clock.now = 10.0 * step
            logger.train_step(step, loss=4.0, lr=1e-3, grad_norm=0.5, tokens_seen=64 * step, tokens_per_s=3000.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("step  10/~100 |") and lines[2].startswith("step  20/~100 |")
