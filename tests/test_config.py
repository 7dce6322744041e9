"""The configuration manager: files, overrides, every error it promises, derived values."""

import math
import subprocess
import sys

import pytest
import yaml

from hanlm.cli import main
from hanlm.config import CONFIG_DIR, Config, all_keys, keys_markdown, load_config, with_micro_batch
from hanlm.errors import ConfigError


def test_builtin_configs_load_and_no_file_means_the_default_config():
    for name in ("tiny", "default", "base", "pd-best"):
        load_config(name)
    assert load_config(None).to_dict() == load_config("default").to_dict()
    assert load_config(None).train.max_steps != Config().train.max_steps  # the demo's, not the key default


def test_overrides_are_coerced_to_the_declared_types():
    cfg = load_config("tiny", ["train.lr=3e-4", "model.n_layer=4", "train.max_tokens=1e6",
                               "data.nfkc=yes", "data.source=/tmp/a.txt", "train.micro_batch=auto",
                               "train.max_minutes=2", "checkpoint.dir=null"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 4 and cfg.model.n_head == 2  # the rest still from the tiny preset
    assert cfg.train.max_tokens == 1_000_000 and isinstance(cfg.train.max_tokens, int)
    assert cfg.data.nfkc is True
    assert cfg.data.source == ["/tmp/a.txt"]
    assert cfg.train.micro_batch == "auto"
    assert cfg.train.max_minutes == 2.0 and isinstance(cfg.train.max_minutes, float)
    assert cfg.checkpoint.dir is None


def test_yaml_file_values_and_overrides_stack(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  lr: 3.0e-4\n  grad_accum: 4\n  block_size: 128\nmodel:\n  preset: tiny\n",
                 encoding="utf-8")
    cfg = load_config(f, ["train.grad_accum=2"])
    assert (cfg.train.lr, cfg.train.grad_accum, cfg.model.n_embd) == (3e-4, 2, 64)


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["trian.lr=1"], "did you mean 'train.lr'?"),
    (["train.n_layer=3"], "did you mean 'model.n_layer'?"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["train.grad_accum=1.5"], "train.grad_accum must be an integer"),
    (["train.grad_accum=0"], "train.grad_accum must be >= 1, got 0"),
    (["train.lr=0"], "train.lr must be > 0.0"),
    (["serve.port=70000"], "serve.port must be <= 65535"),
    (["tokenizer.kind=sentencepiece"], "tokenizer.kind must be one of 'char', 'bpe', 'word'"),
    (["train.micro_batch=big"], "train.micro_batch must be an integer or one of 'auto'"),
    (["data.nfkc=maybe"], "data.nfkc must be true or false"),
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd (100) must be divisible by model.n_head (3)"),
    (["train.block_size=512"], "train.block_size (512) is above model.context_length (256)"),
    (["train.warmup_steps=5000", "train.max_steps=1000"], "train.warmup_steps (5000) is above train.max_steps"),
    (["data.val_fraction=0"], "there is no validation data"),
    (["derived.global_batch=64"], "derived.global_batch is computed"),
    (["train.lr"], "expected KEY=VALUE"),
])
def test_bad_values_give_errors_that_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("default", overrides)
    assert message in str(e.value)


def test_errors_in_a_file_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batchsize: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.batchsize'"):
        load_config(f)
    f.write_text("train: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(f)
    f.write_text("train:\n  lr: [oops\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found.*built-in configs: base, default, ner, pd-best, segment, tiny"):
        load_config(tmp_path / "missing.yaml")


def test_derived_values_are_computed_from_the_keys():
    cfg = load_config("tiny", ["train.micro_batch=8", "train.grad_accum=4", "dist.world_size=3",
                               "train.block_size=64", "train.lr=1e-3", "train.lr_scaling=linear",
                               "train.max_steps=1000", "train.warmup_steps=null", "train.warmup_frac=0.1"])
    d = cfg.derived
    assert d.global_batch == 8 * 4 * 3
    assert d.tokens_per_step == 8 * 4 * 3 * 64
    assert d.lr == pytest.approx(3e-3)
    assert d.warmup_steps == 100 and d.max_steps == 1000
    sqrt = load_config("tiny", ["dist.world_size=4", "train.lr_scaling=sqrt", "train.lr=1e-3"]).derived
    assert sqrt.lr == pytest.approx(2e-3) and sqrt.lr_scale == 2.0
    assert load_config("tiny", ["dist.world_size=4"]).derived.lr == load_config("tiny").train.lr


def test_max_tokens_lowers_max_steps_and_warmup_follows():
    cfg = load_config("tiny", ["train.micro_batch=8", "train.block_size=64", "train.max_steps=1000",
                               "train.max_tokens=51200", "train.warmup_steps=null", "train.warmup_frac=0.1"])
    assert cfg.derived.max_steps == math.ceil(51200 / 512) == 100
    assert cfg.derived.warmup_steps == 10


def test_launcher_world_size_wins_and_auto_batch_is_filled_in_later():
    cfg = load_config("tiny", ["train.micro_batch=auto"], world_size=2)
    assert cfg.derived.world_size == 2 and cfg.derived.global_batch is None
    resolved = with_micro_batch(cfg, 24)
    assert resolved.train.micro_batch == 24 and resolved.derived.global_batch == 48
    assert cfg.train.micro_batch == "auto"  # the original is not modified


def test_saved_resolved_config_loads_back_identically(tmp_path):
    cfg = load_config("tiny", ["train.lr=3e-4", "tokenizer.kind=bpe"])
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["derived"]["global_batch"] == 8
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()


def test_guide_documents_every_key():
    guide = (CONFIG_DIR.parent.parent / "docs" / "guide" / "config.md").read_text(encoding="utf-8")
    assert keys_markdown() in guide, "docs/guide/config.md's key table is stale: paste `hanlm config keys` into it"
    assert len(all_keys()) == keys_markdown().count("\n") - 2


def test_cli_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "--config", "tiny", "--set", "train.grad_accum=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["grad_accum"] == 3 and shown["derived"]["global_batch"] == 24
    assert set(shown) == set(Config().to_dict())


def test_cli_reports_config_errors_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "hanlm.cli", "config", "show", "--set", "train.lrr=1"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in run.stderr
    assert "Traceback" not in run.stderr
