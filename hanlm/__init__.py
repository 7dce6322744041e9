"""hanlm: build, train, evaluate and serve language models for Chinese text."""

__version__ = "0.1.0"
