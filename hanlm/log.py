"""The training run's log: progress bar, console lines, metrics.jsonl, TensorBoard and the final report.

`metrics.jsonl` in the run directory is the record of the run; everything else (console, TensorBoard,
report.md, loss.png) is a view of it. It holds one JSON object per line:

    {"kind": "start", "step": 0, ...}    a run (or a resume) began after `step`
    {"kind": "train", "step": 10, ...}   every `log.every_steps` steps
    {"kind": "eval", "step": 250, ...}   every evaluation

A resumed run appends to the same file, so the report covers the whole run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hanlm.atomic import atomic_path, atomic_write_text
from hanlm.config import LogConfig
from hanlm.errors import DataError

METRICS_FILE = "metrics.jsonl"


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s this machine reaches, the denominator of MFU.

    Times repeated (n, n) @ (n, n) products for about `seconds`: fp32 with n = 2048 on CPU,
    bf16 with n = 8192 on CUDA unless `dtype` says otherwise. Each product is 2·n³ FLOPs.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def timed(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            torch.matmul(a, b, out=out)
        if cuda:  # kernels run asynchronously; wait for them before reading the clock
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(1)  # warm-up: thread pools, cuBLAS handles and kernel selection
    count = max(1, round(seconds / timed(1)))
    return 2 * n**3 * count / timed(count)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order.

    A truncated last line (the process died mid-write) is skipped; a bad line anywhere else
    raises DataError.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not valid JSON; delete that line and retry") from None
    return records


class RunLogger:
    """The training run's log: progress bar, console lines, metrics.jsonl, TensorBoard, report.

    `train_step` is called after every optimizer step and `eval` after every evaluation.
    With `enabled=False` (ranks other than 0) every method does nothing and writes nothing.
    Usable as a context manager, which closes it.
    """

    def __init__(self, run_dir: str | Path, cfg: LogConfig, *, total_steps: int, start_step: int = 0,
                 peak_flops: float | None = None, enabled: bool = True, seconds: float | None = None):
        """`seconds`: the wall time this run may still train (train.max_minutes), if any: the bar and
        the console then show the steps that time will allow, estimated from the pace so far."""
        self.run_dir = Path(run_dir)
        self.cfg, self.total_steps, self.peak_flops, self.enabled = cfg, total_steps, peak_flops, enabled
        self.start_step, self.seconds, self._started = start_step, seconds, time.monotonic()
        self._closed = not enabled
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        _drop_partial_last_line(path)  # else the first record appended would be glued onto it
        self._file = open(path, "a", encoding="utf-8")
        self._write({"kind": "start", "step": start_step, "total_steps": total_steps})
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not cfg.progress)
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run logged after the checkpoint we resume from.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)

    def train_step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens_seen: int,
                   tokens_per_s: float, flops_per_s: float | None = None, memory_bytes: int | None = None,
                   comm_bytes: int | None = None, comm_bytes_total: int | None = None) -> None:
        """Record optimizer step `step` (1-based): the bar moves every call; the console line,
        the metrics.jsonl record and TensorBoard scalars come at step 1, every `log.every_steps`
        steps and the last step."""
        if self._closed:
            return
        self._bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
        expected = self._expected_steps(step)
        if expected != self._bar.total:
            self._bar.total = expected
        self._bar.update(step - self._bar.n)
        if not (step == 1 or step % self.cfg.every_steps == 0 or step == self.total_steps):
            return
        mfu = flops_per_s / self.peak_flops if flops_per_s is not None and self.peak_flops else None
        width = len(str(expected))
        shown = f"~{expected}" if expected < self.total_steps else str(expected)
        parts = [f"step {step:>{width}}/{shown}", f"loss {loss:.4f}", f"lr {lr:.2e}",
                 f"grad {grad_norm:.3f}", f"{tokens_per_s:,.0f} tok/s"]
        if mfu is not None:
            parts.append(f"MFU {mfu:.1%}")
        if memory_bytes is not None:
            parts.append(f"mem {memory_bytes / 1e9:.2f} GB")
        if comm_bytes_total is not None:
            parts.append(f"sent {comm_bytes_total / 1e6:,.1f} MB")
        self.message(" | ".join(parts))
        self._write({"kind": "train", "step": step, "tokens": tokens_seen, "loss": loss, "lr": lr,
                     "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                     "memory_bytes": memory_bytes, "comm_bytes": comm_bytes, "comm_bytes_total": comm_bytes_total})
        if self._tb is not None:
            scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                       "tokens_seen": tokens_seen, "mfu": mfu, "comm_bytes_total": comm_bytes_total}
            for name, value in scalars.items():
                if value is not None:
                    self._tb.add_scalar(f"train/{name}", value, step)

    def _expected_steps(self, step: int) -> int:
        """The run's last step: total_steps, or sooner what the time left allows at the pace so far."""
        done, elapsed = step - self.start_step, time.monotonic() - self._started
        if self.seconds is None or done <= 0 or elapsed <= 0:
            return self.total_steps
        return min(self.total_steps, max(step, round(self.start_step + done * self.seconds / elapsed)))

    def eval(self, step: int, tokens_seen: int, metrics: dict[str, float]) -> None:
        """Record an evaluation at `step`; `metrics` maps names ("loss", "bpc", "ppl_char",
        "ppl_token", ...) to values."""
        if self._closed:
            return
        # Known metrics first, in a fixed order and format; any others after them.
        formats = {"loss": ("val loss", ".4f"), "bpc": ("bpc", ".3f"), "ppl_char": ("ppl/char", ".1f"),
                   "ppl_token": ("ppl/token", ".1f"), "tune_loss": ("tune loss", ".4f")}
        names = [n for n in formats if n in metrics] + [n for n in metrics if n not in formats]
        parts = [f"eval step {step}"]
        for name in names:
            label, spec = formats.get(name, (name, ".4g"))
            parts.append(f"{label} {metrics[name]:{spec}}")
        self.message(" | ".join(parts))
        self._write({"kind": "eval", "step": step, "tokens": tokens_seen, **metrics})
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"val/{name}", value, step)

    def message(self, text: str) -> None:
        """Print a console line above the progress bar without breaking it."""
        if not self._closed:
            tqdm.write(text)  # a plain print when no bar is shown

    def close(self) -> None:
        """Close the bar, the TensorBoard writer and metrics.jsonl; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_report(self, title: str, sections: dict[str, str] | None = None) -> Path:
        """Write run_dir/report.md (summary table, loss plot, then `sections` as heading -> markdown
        body) and run_dir/loss.png from the whole of metrics.jsonl; return the report's path.

        Can be called before or after `close`. Records that a resume superseded are left out.
        """
        report = self.run_dir / "report.md"
        if not self.enabled:
            return report
        if not self._closed:
            self._file.flush()
        records = _current_records(read_metrics(self.run_dir / METRICS_FILE))
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        lines = [f"# {title}", ""]
        if train or evals:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary(train, evals).items()]
            if _plot_loss(train, evals, self.run_dir / "loss.png"):
                lines += ["", "![loss](loss.png)"]
        else:
            lines.append("No steps were logged.")
        for heading, body in (sections or {}).items():
            lines += ["", f"## {heading}", "", body.rstrip()]
        atomic_write_text(report, "\n".join(lines) + "\n")
        return report

    def _write(self, record: dict[str, Any]) -> None:
        # One write per line and a flush per record: a crash loses at most the line being written.
        self._file.write(json.dumps({**record, "time": time.time()}, ensure_ascii=False) + "\n")
        self._file.flush()


def _drop_partial_last_line(path: Path) -> None:
    """Cut an unfinished last line, left by a crash mid-write, off the end of `path`."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _current_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as it finally went: a run that started (or resumed) after step s
    replaces everything logged after s before it."""
    kept: list[dict[str, Any]] = []
    for r in records:
        if r["kind"] == "start":
            kept = [k for k in kept if k["step"] <= r["step"]]
        else:
            kept.append(r)
    return kept


def _summary(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, str]:
    """The report's summary table: row name -> formatted value, only for what was logged."""
    last = max(train + evals, key=lambda r: r["step"])
    rows = {"final step": f"{last['step']:,}", "tokens seen": f"{last['tokens']:,}"}
    if train:
        rows["final train loss"] = f"{train[-1]['loss']:.4f}"
        rows["mean tokens/s"] = f"{_mean(r['tokens_per_s'] for r in train):,.0f}"
        mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
        if mfus:
            rows["mean MFU"] = f"{_mean(mfus):.1%}"
    for key, label, spec in [("loss", "val loss", ".4f"), ("bpc", "val bpc", ".3f")]:
        values = [r[key] for r in evals if key in r]
        if values:
            rows[f"best {label}"] = f"{min(values):{spec}}"
            rows[f"final {label}"] = f"{values[-1]:{spec}}"
    return rows


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def _plot_loss(train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> bool:
    """Plot train and val loss against tokens seen into the PNG `path`; False when no loss was logged."""
    series = {}
    if train:
        series["train"] = ([r["tokens"] for r in train], [r["loss"] for r in train], "-")
    val = [r for r in evals if "loss" in r]
    if val:
        series["val"] = ([r["tokens"] for r in val], [r["loss"] for r in val], "o-")
    if series:
        line_plot(series, "tokens seen", "loss", path)
    return bool(series)


def line_plot(series: dict[str, tuple[list[float], list[float], str]], xlabel: str, ylabel: str, path: Path) -> None:
    """One line per label, (x values, y values, matplotlib format), into the PNG `path`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.add_subplot()
    for label, (x, y, style) in series.items():
        ax.plot(x, y, style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
