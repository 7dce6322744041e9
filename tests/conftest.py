"""Shared fixtures: every test run gets its own HANLM_HOME, so nothing touches ~/.cache."""

import json
import os
import tempfile

import pytest

os.environ["HANLM_HOME"] = tempfile.mkdtemp(prefix="hanlm-test-home-")


@pytest.fixture(scope="session")
def people_daily() -> list[str]:
    """The documents of the built-in People's Daily 1998 corpus, as the reader stores them."""
    from hanlm.data.corpora import corpus_file

    with open(corpus_file("people-daily-1998"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]
