"""The evaluation protocol: side-by-side windows and sliding windows (eval.stride)."""

import math

import numpy as np
import pytest
import torch

from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import ConfigError
from hanlm.eval import evaluate
from hanlm.models import build_model


@pytest.fixture(scope="module")
def model_and_text(people_daily):
    tokenizer = train_tokenizer("char", people_daily[:300])
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, tokenizer.vocab_size).eval()
    return model, np.asarray(tokenizer.encode_documents(people_daily[300:310]), dtype=np.int64)[:75]


def by_hand(model, tokens: np.ndarray, block: int, stride: int) -> float:
    """Mean NLL with every target t predicted from the window that scores it: the first window
    (start 0) up to target `block`, then the window starting at the first multiple of stride
    that reaches t."""
    total = 0.0
    for t in range(1, len(tokens)):
        start = 0 if t <= block else math.ceil((t - block) / stride) * stride
        x = torch.from_numpy(tokens[start:t])[None]
        with torch.no_grad():
            logp, _ = model.log_probs(x, model.initial_state(1))
        total -= float(logp[0, -1, tokens[t]])
    return total / (len(tokens) - 1)


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_sliding_windows_score_every_token_once_with_the_context_they_promise(model_and_text, stride):
    model, tokens = model_and_text
    result = evaluate(model, tokens, block_size=16, batch_size=3, characters=100, stride=stride)
    assert result.tokens == len(tokens) - 1 and result.characters == 100
    assert result.loss == pytest.approx(by_hand(model, tokens, 16, stride), rel=1e-5)


def test_no_stride_is_windows_side_by_side(model_and_text):
    model, tokens = model_and_text
    plain = evaluate(model, tokens, block_size=16, batch_size=4, characters=100)
    assert plain.loss == evaluate(model, tokens, block_size=16, batch_size=4, characters=100, stride=16).loss


def test_a_stride_longer_than_the_block_is_refused(model_and_text):
    model, tokens = model_and_text
    with pytest.raises(ValueError, match="stride must be between 1 and the window"):
        evaluate(model, tokens, block_size=16, batch_size=4, characters=100, stride=17)
    with pytest.raises(ConfigError, match=r"eval.stride \(300\) is above train.block_size"):
        load_config("tiny", ["eval.stride=300"])


def test_hanlm_eval_takes_a_stride_and_names_a_bad_one(tmp_path, capsys):
    import json

    from hanlm.cli import main
    from hanlm.train.loop import Trainer

    run = Trainer(load_config("tiny", [f"train.run_dir={tmp_path}", "train.max_steps=4", "log.peak_tflops=0.1"]),
                  echo=lambda _: None).run()
    capsys.readouterr()  # the run's log lines
    assert main(["eval", str(run.checkpoint), "--json"]) == 0
    side_by_side = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run.checkpoint), "--json", "--stride", "16"]) == 0
    sliding = json.loads(capsys.readouterr().out)
    assert sliding["tokens"] == side_by_side["tokens"] and sliding["loss"] != side_by_side["loss"]
    assert main(["eval", str(run.checkpoint), "--stride", "65"]) == 2
    assert "--stride 65: the windows of" in capsys.readouterr().err
