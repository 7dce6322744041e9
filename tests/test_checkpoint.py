"""Checkpoints under attack: verified files, safe fallback, nothing lost, one writer, no pickle."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from planted import plant, rewrite_manifest

from hanlm.atomic import atomic_dir, owner_tag
from hanlm.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_best,
    save_checkpoint,
)
from hanlm.loading import load_for_inference, resolve_checkpoint
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.errors import CheckpointError, ConfigError
from hanlm.eval import evaluate
from hanlm.manifest import MANIFEST, sha256_file
from hanlm.models import build_model
from hanlm.runlock import RunLock, RunLockedError
from hanlm.state_file import load_state, save_state
from hanlm.train.loop import Trainer

quiet = lambda _: None  # noqa: E731


def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", "train.max_steps=30",
                                "checkpoint.every_steps=10", "eval.every_steps=10", "generate.max_tokens=2",
                                *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with checkpoints at steps 10, 20 and 30, copied fresh into each test."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(tiny(run_dir), echo=quiet).run()
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def step_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:08d}"


def flip_bytes(path, count=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -- the manifest --------------------------------------------------------------------------------

def test_every_file_is_in_the_manifest_with_its_size_and_sha256(run_dir):
    ckpt = step_dir(run_dir, 30)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 30 and manifest["val_loss"] > 0
    assert set(manifest["files"]) == {"model.safetensors", "config.yaml", "tokenizer.json", "train_state.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry == {"size": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.safetensors", "tokenizer.json", "config.yaml"])
def test_flipped_bytes_are_found_and_resume_falls_back_to_the_previous_good_one(run_dir, name):
    flip_bytes(step_dir(run_dir, 30) / name)
    with pytest.raises(CheckpointError, match=rf"step-00000030/{name} is damaged: its contents differ"):
        load_checkpoint(str(step_dir(run_dir, 30)))
    messages = []
    trainer = Trainer(tiny(run_dir, "train.max_steps=40"), resume="auto", echo=messages.append)
    result = trainer.run()
    assert any("resumed from" in m and "step-00000020" in m for m in messages)
    assert result.step == 40
    # The damaged one is kept aside, not deleted, and the pointers name checkpoints that exist.
    aside = list((run_dir / "checkpoints").glob("damaged-*/step-00000030"))
    assert len(aside) == 1
    assert list_checkpoints(str(run_dir / "checkpoints"))[-1] == "step-00000040"
    assert resolve_checkpoint(str(run_dir / "checkpoints")).endswith("step-00000040")
    assert read_best(str(run_dir / "checkpoints"))[0] in list_checkpoints(str(run_dir / "checkpoints"))


def test_a_truncated_file_is_named_as_truncated(run_dir):
    path = step_dir(run_dir, 30) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged: 5,000 bytes where .* \(truncated\)"):
        load_checkpoint(str(step_dir(run_dir, 30)))


def test_a_damaged_manifest_is_named(run_dir):
    (step_dir(run_dir, 30) / MANIFEST).write_text('{"format": 1, "files": [')
    with pytest.raises(CheckpointError, match=r"step-00000030/manifest\.json is damaged"):
        load_checkpoint(str(step_dir(run_dir, 30)))


def test_a_checkpoint_without_a_manifest_still_loads_with_a_note(run_dir):
    (step_dir(run_dir, 30) / MANIFEST).unlink()
    notes = []
    ckpt = load_checkpoint(str(step_dir(run_dir, 30)), note=notes.append)
    assert ckpt.step == 30 and len(notes) == 1 and "has no manifest.json" in notes[0]


def test_eval_generate_and_serve_loading_verify_too(run_dir, capsys):
    flip_bytes(step_dir(run_dir, 30) / "model.safetensors")
    for argv in (["eval", str(step_dir(run_dir, 30))], ["generate", str(step_dir(run_dir, 30)), "--prompt", "今天"]):
        assert main(argv) == 2
        assert "step-00000030/model.safetensors is damaged" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        load_for_inference(str(run_dir / "checkpoints"))  # what `hanlm serve` loads
    cfg = tiny(run_dir, f"train.init_from={step_dir(run_dir, 30)}")
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        Trainer(cfg, echo=quiet)


# -- never lose a run ----------------------------------------------------------------------------

def test_when_every_checkpoint_is_damaged_resume_stops_and_lists_them(run_dir):
    for step in (10, 20, 30):
        (step_dir(run_dir, step) / "tokenizer.json").write_text("{garbage")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(CheckpointError) as caught:
        Trainer(tiny(run_dir), resume="auto", echo=quiet)
    message = str(caught.value)
    assert "every checkpoint" in message and "--restart-if-damaged" in message
    for step in (10, 20, 30):
        assert f"step-{step:08d}/tokenizer.json is damaged" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing moved or deleted
    # The command says the same, without a traceback.
    done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "tiny", "--set",
                           f"train.run_dir={run_dir}", "--resume", "auto"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "every checkpoint" in done.stderr


def test_restart_if_damaged_moves_them_aside_and_its_pruning_never_touches_them(run_dir):
    for step in (10, 20, 30):
        (step_dir(run_dir, step) / "tokenizer.json").write_text("{garbage")
    messages = []
    result = Trainer(tiny(run_dir, "checkpoint.keep_last=1"), resume="auto", restart_if_damaged=True,
                     echo=messages.append).run()
    assert any("starting over from step 0" in m for m in messages)
    assert result.step == 30 and list_checkpoints(str(run_dir / "checkpoints"))[-1] == "step-00000030"
    aside = next((run_dir / "checkpoints").glob("damaged-*"))
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000010", "step-00000020", "step-00000030"]
    assert (aside / "step-00000030" / "tokenizer.json").read_text() == "{garbage"


def test_a_fresh_start_moves_an_earlier_runs_checkpoints_aside(run_dir):
    messages = []
    Trainer(tiny(run_dir, "train.max_steps=10", "checkpoint.keep_last=1"), echo=messages.append).run()
    assert any("checkpoints of an earlier run" in m for m in messages)
    earlier = next((run_dir / "checkpoints").glob("earlier-*"))
    assert sorted(p.name for p in earlier.glob("step-*")) == ["step-00000010", "step-00000020", "step-00000030"]
    assert list_checkpoints(str(run_dir / "checkpoints")) == ["step-00000010"]


def test_pruning_keeps_newer_better_and_resumed_checkpoints(run_dir):
    root = str(run_dir / "checkpoints")
    ckpt = load_checkpoint(str(step_dir(run_dir, 10)))
    cfg = tiny(run_dir, "checkpoint.keep_last=1", "checkpoint.keep_best=false")
    model = build_model(cfg.model, ckpt.tokenizer.vocab_size)
    state = {**ckpt.train_state, "step": 5}
    # An older step written after newer ones (a run restarted from an earlier checkpoint): nothing newer goes.
    save_checkpoint(root, model, cfg, ckpt.tokenizer, state, val_loss=99.0, note=quiet)
    assert list_checkpoints(root) == ["step-00000005", "step-00000010", "step-00000020", "step-00000030"]
    # A worse checkpoint past all of them: the better ones (lower recorded val loss) and the protected one stay.
    save_checkpoint(root, model, cfg, ckpt.tokenizer, {**state, "step": 50}, val_loss=50.0,
                    protect=[str(step_dir(run_dir, 5))], note=quiet)
    assert list_checkpoints(root) == ["step-00000005", "step-00000010", "step-00000020", "step-00000030",
                                      "step-00000050"]
    # A better one: the worse older ones may go, the protected one stays.
    save_checkpoint(root, model, cfg, ckpt.tokenizer, {**state, "step": 60}, val_loss=0.5,
                    protect=[str(step_dir(run_dir, 5))], note=quiet)
    assert list_checkpoints(root) == ["step-00000005", "step-00000060"]


def test_garbage_pointers_are_ignored_with_a_note(run_dir):
    root = run_dir / "checkpoints"
    (root / "best").write_text("could not convert string to float")
    (root / "latest").write_bytes(b"\xff\xfe\x00garbage")
    notes = []
    assert read_best(str(root), notes.append) is None and "best" in notes[0]
    assert resolve_checkpoint(str(root), notes.append).endswith("step-00000030")
    # Every save still works and puts sane pointers back.
    result = Trainer(tiny(run_dir, "train.max_steps=40"), resume="auto", echo=notes.append).run()
    assert result.step == 40
    assert (root / "latest").read_text().strip() == "step-00000040"
    assert read_best(str(root)) is not None


# -- one writer ----------------------------------------------------------------------------------

def test_a_second_writer_on_the_same_run_directory_fails_at_once(run_dir):
    with RunLock(run_dir):
        done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "tiny", "--set",
                               f"train.run_dir={run_dir}", "--resume", "auto"], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()}" in done.stderr
        with pytest.raises(RunLockedError):
            Trainer(tiny(run_dir), resume="auto", echo=quiet)
    assert list_checkpoints(str(run_dir / "checkpoints")) == ["step-00000010", "step-00000020", "step-00000030"]


def test_a_lock_left_by_a_dead_process_is_taken_over(run_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                               "since": "2026-01-01 00:00:00"}))
    trainer = Trainer(tiny(run_dir, "train.max_steps=40"), resume="auto", echo=quiet)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert trainer.run().step == 40


def test_a_garbage_lock_file_is_taken_over_and_a_held_one_still_refuses(tmp_path):
    (tmp_path / ".lock").write_bytes(b"\xff\xfe garbage {")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released: free again


KILLED_WRITER = """
import sys, time
from hanlm.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half").write_text("half-written")
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_temporaries_of_a_killed_writer_are_removed_at_the_next_start(run_dir, tmp_path):
    root = run_dir / "checkpoints"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root / "step-00000040")],
                              stdout=subprocess.PIPE, text=True)
    left = writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    live = root / f".step-00000050.{owner_tag()}.x.tmp"  # this (live) process's: must stay
    live.mkdir()
    assert os.path.isdir(left)
    messages = []
    Trainer(tiny(run_dir), resume="auto", echo=messages.append).close()
    assert not os.path.exists(left) and live.is_dir()
    assert any("left half-written by a run that died" in m for m in messages)
    # The same mechanism serves every atomic output (prepared data, corpora): the next write cleans up.
    out = tmp_path / "prepared" / "corpus-char"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    left = writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert not os.path.exists(left) and (out / "done").exists()


# -- no pickle -----------------------------------------------------------------------------------

def test_a_pickle_planted_in_every_file_runs_nothing(run_dir, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = step_dir(run_dir, 30)
    for f in ckpt.iterdir():
        if f.name != MANIFEST:
            plant(f, marker)
    rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(str(ckpt))
    for argv in (["eval", str(ckpt)], ["generate", str(ckpt)]):
        assert main(argv) == 2
    with pytest.raises(CheckpointError):
        load_for_inference(str(ckpt))
    trainer = Trainer(tiny(run_dir), resume="auto", echo=quiet)  # falls back to step 20
    trainer.close()
    assert trainer.step == 20
    # A checkpoint from before the manifest: its train_state.pt goes through torch's restricted unpickler.
    old = step_dir(run_dir, 20)
    (old / MANIFEST).unlink()
    (old / "train_state.safetensors").unlink()
    plant(old / "train_state.pt", marker)
    with pytest.raises(CheckpointError, match=r"train_state\.pt is damaged"):
        load_checkpoint(str(old), note=quiet)
    capsys.readouterr()
    assert not marker.exists()


def test_state_files_round_trip_and_refuse_what_they_did_not_write(tmp_path):
    state = {"step": 7, "best": math.inf, "big": 2 ** 70, "none": None, "flag": True, "name": "今天",
             "ranks": [{"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
                                      "param_groups": [{"betas": (0.9, 0.95), "params": [0]}]},
                        "rng": torch.get_rng_state(), "empty": torch.zeros(0)}]}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["ranks"][0]["optimizer"]["param_groups"] == [{"betas": (0.9, 0.95), "params": [0]}]
    assert list(back["ranks"][0]["optimizer"]["state"]) == [0]  # int keys stay ints
    assert torch.equal(back["ranks"][0]["rng"], state["ranks"][0]["rng"])
    assert (back["step"], back["best"], back["big"], back["none"], back["flag"], back["name"]) == \
        (7, math.inf, 2 ** 70, None, True, "今天")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="hanlm.state"):
        load_state(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "deep.safetensors"),
              metadata={"hanlm.state": '{"format": 1, "state": ' + "[" * 5000 + "]" * 5000 + "}"})
    with pytest.raises(ValueError):
        load_state(tmp_path / "deep.safetensors")


# -- evaluation of a diverged model ----------------------------------------------------------------

def test_a_huge_loss_gives_infinite_perplexity_not_a_crash(run_dir):
    model, cfg, tokenizer = load_for_inference(str(step_dir(run_dir, 30)))
    with torch.no_grad():
        model.norm.weight.mul_(1e5)  # logits 100,000 times too large: a diverged model
    tokens = torch.randint(4, tokenizer.vocab_size, (200,)).numpy().astype("uint16")
    result = evaluate(model, tokens, block_size=32, batch_size=4, characters=200)
    assert result.loss > 1000 and math.isinf(result.ppl_token) and math.isinf(result.ppl_char)
    assert math.isfinite(result.bpc) and "inf" in result.summary()


# -- manifests cover what loads; readers and retention; the device -------------------------------

@pytest.mark.parametrize("listing", ["without the weights", "empty"])
def test_a_manifest_that_skips_a_file_the_loader_reads_is_refused(run_dir, listing):
    ckpt = step_dir(run_dir, 30)
    flip_bytes(ckpt / "model.safetensors")  # damage it would hide
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {} if listing == "empty" else {k: v for k, v in manifest["files"].items()
                                                        if k != "model.safetensors"}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json does not list (model.safetensors|config.yaml)"):
        load_checkpoint(str(ckpt))
    assert main(["eval", str(ckpt)]) == 2
    found = Trainer(tiny(run_dir), resume="auto", echo=quiet)  # --resume auto walks past it, to step 20
    try:
        assert found.step == 20
    finally:
        found.close()


def test_a_checkpoint_pruned_while_it_is_read_is_named_and_the_newest_is_read_instead(run_dir, monkeypatch, capsys):
    import hanlm.checkpoint as storage

    real, pruned = storage.load_config, []

    def retention_strikes(path):  # the running training prunes step 30 the moment a reader opens it
        if not pruned and "step-00000030" in str(path):
            pruned.append(path)
            shutil.rmtree(step_dir(run_dir, 30))
            (run_dir / "checkpoints" / "latest").write_text("step-00000020\n")
        return real(path)

    monkeypatch.setattr(storage, "load_config", retention_strikes)
    model, _, _ = load_for_inference(str(run_dir))  # a run directory: the newest that is still there
    assert pruned and model is not None and not step_dir(run_dir, 30).exists()
    err = capsys.readouterr().err
    assert "was removed while it was being read" in err and "checkpoint.keep_last" in err and "damaged" not in err
    pruned.clear()
    shutil.copytree(step_dir(run_dir, 20), step_dir(run_dir, 30))
    with pytest.raises(CheckpointError, match="was removed while it was being read"):
        load_checkpoint(str(step_dir(run_dir, 30)))  # a path to one checkpoint is never swapped for another


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_blames_the_device_not_the_checkpoint(run_dir, capsys):
    with pytest.raises(ConfigError, match="no CUDA device is available here"):
        load_checkpoint(str(step_dir(run_dir, 30)), map_location="cuda")
    assert main(["eval", str(run_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "damaged" not in err


def test_the_lock_message_names_the_key_of_the_run_that_asks(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="give this run another finetune.run_dir"):
            RunLock(tmp_path, "finetune.run_dir").acquire()


@pytest.mark.parametrize("selected_on", ["val", "tune"])
def test_a_run_directory_means_its_result_and_names_the_other_candidate(tmp_path, people_daily, selected_on):
    """Ranked by the held-out tune split, a language model's run directory means its best checkpoint; ranked by
    val (data without a tune split) its latest, since picking by val would flatter val. Either names the other."""
    from hanlm.data.tokenizer import train_tokenizer
    from hanlm.loading import resolve_served

    cfg = load_config("tiny")
    tokenizer = train_tokenizer("char", people_daily[:50])
    model = build_model(cfg.model, tokenizer.vocab_size)
    root = str(tmp_path / "run" / "checkpoints")
    for step, loss in ((1, 4.0), (2, 3.5), (3, 3.9)):  # the held-out loss rose at the end: overfitting
        save_checkpoint(root, model, cfg, tokenizer, {"step": step}, val_loss=loss, selected_on=selected_on,
                        note=lambda _: None)
    notes = []
    chosen = resolve_served(str(tmp_path / "run"), notes.append)
    if selected_on == "tune":
        assert chosen == f"{root}/step-00000002"
        assert notes == [f"note: {tmp_path / 'run'}: using its best checkpoint by held-out tune loss, step-00000002 "
                         f"(3.5000); its latest is step-00000003: give {root}/step-00000003 to use that one"]
    else:
        assert chosen == f"{root}/step-00000003"
        assert notes == [f"note: {tmp_path / 'run'}: using its latest checkpoint, step-00000003; its best by val "
                         f"loss is step-00000002 (3.5000): give {root}/step-00000002 to use that one"]
    notes.clear()
    assert resolve_served(f"{root}/step-00000003", notes.append).endswith("step-00000003") and not notes