"""Hostile values, round two (issue 29): numbers that are not finite, out of range or absurdly large, empty
keys and paths, files nested thousands deep or never ending, tags and fields that do not apply. Each
is refused with exit status 2 and a message naming the key, flag or file, never a traceback, and
never after a large allocation."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hanlm.cli import main
from hanlm.config import SECTIONS, load_config
from hanlm.errors import ConfigError, DataError

# -- every numeric key, from the config schema ---------------------------------------------------


def _numeric_keys() -> list[tuple[str, type, typing.Mapping]]:
    keys = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            number = next((a for a in args if a in (int, float)), None)
            if number is not None:
                keys.append((f"{section}.{f.name}", number, f.metadata))
    return keys


NUMERIC = _numeric_keys()
FLOAT_KEYS = [k for k in NUMERIC if k[1] is float]
INT_KEYS = [k for k in NUMERIC if k[1] is int]


def in_range(value: float, meta: typing.Mapping) -> bool:
    """What the key's declaration allows: finite, and within min / above / max / below."""
    return (math.isfinite(value) and (meta["min"] is None or value >= meta["min"])
            and (meta["above"] is None or value > meta["above"]) and (meta["max"] is None or value <= meta["max"])
            and (meta["below"] is None or value < meta["below"]))


def test_the_schema_bounds_every_number():
    assert len(FLOAT_KEYS) > 30 and len(INT_KEYS) > 40
    unbounded = [name for name, _, meta in NUMERIC if (meta["max"] is None and meta["below"] is None)
                 or (meta["min"] is None and meta["above"] is None)]
    assert not unbounded, f"numeric keys without both bounds: {unbounded}"


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", "1e300", "-1e300", "-1.0"])
@pytest.mark.parametrize("name", [k[0] for k in FLOAT_KEYS])
def test_a_float_key_refuses_what_is_not_a_sane_number(name, value, capsys):
    assert main(["config", "show", "--set", f"{name}={value}"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


@pytest.mark.parametrize("value", [0, -1, -5, 2**70, -(2**70)])
@pytest.mark.parametrize("key", INT_KEYS, ids=[k[0] for k in INT_KEYS])
def test_an_integer_key_takes_only_its_range(key, value, capsys):
    name, _, meta = key
    code = main(["config", "show", "--set", f"{name}={value}"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if in_range(value, meta):
        assert code == 0 or "hanlm: error:" in err  # allowed, unless another key's check objects
    else:
        assert code == 2 and name in err


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(NUMERIC), value=st.one_of(st.floats(), st.integers(-(2**80), 2**80)))
def test_any_number_for_any_key_is_taken_in_range_or_refused_by_name(key, value):
    name, kind, meta = key
    if kind is int and isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        return  # a type error, covered by test_config
    try:
        cfg = load_config("tiny", [f"{name}={value!r}"])
    except ConfigError as e:  # refused: by its own range (then named), or by a check across keys
        if not in_range(float(value), meta):
            assert name in str(e)
        return
    section, leaf = name.split(".")
    taken = getattr(getattr(cfg, section), leaf)
    assert in_range(float(taken), meta), f"{name}={value!r} was accepted as {taken!r}, outside its range"


def test_a_config_nested_thousands_deep_is_named(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: {lr: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert main(["config", "show", "--config", str(deep)]) == 2
    err = capsys.readouterr().err
    assert str(deep) in err and "nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize("key", ["train.run_dir", "finetune.run_dir", "checkpoint.dir", "data.prepared_dir"])
def test_an_empty_directory_key_is_refused(key, capsys):
    assert main(["config", "show", "--set", f"{key}="]) == 2
    assert f"{key} is empty" in capsys.readouterr().err


# -- commands and their flags --------------------------------------------------------------------

@pytest.fixture
def no_server(monkeypatch):
    """`hanlm serve` up to the point of serving: what it would have served with, recorded."""
    import hanlm.serve.app

    calls = []
    monkeypatch.setattr(hanlm.serve.app, "serve", lambda spec, **kw: calls.append(kw))
    monkeypatch.delenv("HANLM_API_KEY", raising=False)
    return calls


@pytest.mark.parametrize("argv, message", [
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "   "], "--api-key is empty"),
    (["--port", "-1"], "--port: serve.port must be >= 1"),
    (["--port", "70000"], "--port: serve.port must be <= 65535"),
    (["--max-batch", "0"], "--max-batch: serve.max_batch must be >= 1"),
    (["--max-batch", "-1"], "--max-batch: serve.max_batch must be >= 1"),
    (["--max-queue", "0"], "--max-queue: serve.max_queue must be >= 1"),
    (["--max-queue", "-5"], "--max-queue: serve.max_queue must be >= 1"),
])
def test_serve_refuses_empty_keys_and_impossible_limits(no_server, argv, message, capsys):
    assert main(["serve", "some/checkpoint", *argv]) == 2
    assert message in capsys.readouterr().err and not no_server


def test_an_empty_key_in_the_environment_is_refused(no_server, monkeypatch, capsys):
    monkeypatch.setenv("HANLM_API_KEY", "")
    assert main(["serve", "some/checkpoint"]) == 2
    assert "HANLM_API_KEY is set but empty" in capsys.readouterr().err and not no_server


def test_without_a_key_the_server_binds_loopback_unless_told_otherwise(no_server, capsys):
    assert main(["serve", "ck", "--set", "serve.host=0.0.0.0"]) == 0
    assert no_server[-1]["host"] == "127.0.0.1" and no_server[-1]["api_key"] is None
    assert "no API key, so serving on 127.0.0.1 rather than serve.host 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "ck", "--host", "0.0.0.0"]) == 0
    assert no_server[-1]["host"] == "0.0.0.0"
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    assert main(["serve", "ck", "--host", "0.0.0.0", "--api-key", "k3y"]) == 0
    assert no_server[-1]["host"] == "0.0.0.0" and no_server[-1]["api_key"] == "k3y"
    assert "warning" not in capsys.readouterr().err


@pytest.fixture
def no_generation(monkeypatch):
    """`hanlm generate` with a stand-in model: the flags are checked, nothing is decoded."""
    import hanlm.generate
    import hanlm.loading

    calls = []
    stand_in = types.SimpleNamespace(generates=True, device=torch.device("cpu"))
    monkeypatch.setattr(hanlm.loading, "load_for_inference", lambda spec, device: (stand_in, load_config("tiny"), None))

    def record(model, tokenizer, prompt, params, **kw):
        calls.append(params)
        return iter(())

    monkeypatch.setattr(hanlm.generate, "generate", record)
    return calls


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "generate.temperature must be a finite number"),
    ("--temperature", "inf", "generate.temperature must be a finite number"),
    ("--temperature", "-1", "generate.temperature must be >= 0"),
    ("--temperature", "3", "generate.temperature must be <= 2.0"),
    ("--top-p", "0", "generate.top_p must be > 0"),
    ("--top-p", "2", "generate.top_p must be <= 1.0"),
    ("--top-p", "nan", "generate.top_p must be a finite number"),
    ("--top-k", "-5", "generate.top_k must be >= -1"),
    ("--seed", "-1", "generate.seed must be >= 0"),
    ("--max-tokens", "-1", "generate.max_tokens must be >= 1"),
    ("--max-tokens", "0", "generate.max_tokens must be >= 1"),
])
def test_generate_checks_sampling_values_by_the_servers_bounds(no_generation, flag, value, message, capsys):
    assert main(["generate", "ck", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {message}" in err and "shorten the prompt" not in err and not no_generation


def test_generate_takes_values_the_server_takes(no_generation):
    assert main(["generate", "ck", "--temperature", "2", "--top-p", "1", "--top-k", "-1", "--seed", "0"]) == 0
    (params,) = no_generation
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (2.0, 1.0, -1, 0)


@pytest.mark.parametrize("argv", [["train", "--nproc", "0"], ["train", "--nproc", "-2"],
                                  ["finetune", "--nproc", "0"], ["train", "--nproc", str(2**70)],
                                  ["eval", "ck", "--stride", "0"]])
def test_process_counts_and_strides_are_whole_positive_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[-2] in err and "Traceback" not in err


# -- memory before allocation ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["model.n_embd=65536", "model.n_head=1"], ["model.n_layer=512",
                                                                                   "model.n_embd=8192"]])
def test_a_model_that_cannot_fit_is_refused_before_it_is_allocated(overrides):
    from hanlm.memory import can_reset_peak_rss, peak_rss, reset_peak_rss
    from hanlm.models import build_model

    cfg = load_config("tiny", [*overrides, "train.block_size=64"])
    if can_reset_peak_rss():
        reset_peak_rss()
    before = peak_rss()
    with pytest.raises(ConfigError, match="GiB for its weights alone") as e:
        build_model(cfg.model, 8000)
    assert "model.n_embd" in str(e.value) and "model.n_layer" in str(e.value)
    if can_reset_peak_rss():
        assert peak_rss() - before < 1 << 30


def test_the_pre_flight_counts_what_the_model_holds():
    from hanlm.models import build_model, preflight

    cfg = load_config("tiny")
    model = build_model(cfg.model, 500)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert preflight(cfg.model, 500) == held
    with pytest.raises(ConfigError, match="0.0 GiB of memory is available"):
        preflight(cfg.model, 500, available=held - 1)


def test_word_vectors_must_be_a_regular_file():
    from hanlm.data.tokenizer import train_tokenizer
    from hanlm.models.vectors import load_vectors

    tokenizer = train_tokenizer("char", ["人民日报"])
    with pytest.raises(DataError, match="/dev/zero: model.vectors must be a regular file"):
        load_vectors("/dev/zero", tokenizer, torch.nn.Embedding(tokenizer.vocab_size, 8))


# -- files whose values or tags do not hold --------------------------------------------------------

@pytest.mark.parametrize("row", ["nan\t人民", "-inf\t人民", "-1.0\t人民\tnan", "-1.0\t人民\tinf"])
def test_an_arpa_value_that_is_not_finite_is_refused_by_line(tmp_path, row, capsys):
    arpa = tmp_path / "m.arpa"
    arpa.write_text("\\data\\\nngram 1=4\nngram 2=1\n\n\\1-grams:\n-1.0\t<s>\t-0.3\n-1.0\t</s>\n"
                    f"{row}\n-0.5\t日报\t-0.2\n\n\\2-grams:\n-0.2\t人民 日报\n\n\\end\\\n", encoding="utf-8")
    assert main(["eval", str(arpa), "--data", "people-daily-1998"]) == 2
    err = capsys.readouterr().err
    assert f"{arpa}:8" in err and "not a finite number" in err


def test_a_conll_tag_outside_bmes_in_a_character_tagged_sentence_is_named(tmp_path):
    from hanlm.config import DataConfig
    from hanlm.data.tagged import read_tagged

    conll = tmp_path / "t.conll"
    conll.write_text("人\tB\n民\tE\n日\tX\n报\tE\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t.conll:3: tag 'X' is not B, M, E or S"):
        list(read_tagged([str(conll)], DataConfig(), "conll"))


@pytest.mark.parametrize("key", ["finetune.text_field=content", "finetune.label_field=stars"])
def test_a_field_key_on_built_in_data_is_refused_not_ignored(key):
    from hanlm.tasks.labelled import read_labelled

    with pytest.raises(ConfigError, match=f"{key.split('=')[0]} '{key.split('=')[1]}' does not apply to the "
                                          "built-in corpus chn-reviews"):
        read_labelled(load_config("tiny", [key]))
