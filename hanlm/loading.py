"""One place that turns a path into what it holds: a language model of any arch, an n-gram, a mixture,
an ARPA file, a Hugging Face directory, a classifier or a tagger.

It sits above the storage (`hanlm.checkpoint`, `hanlm.mixture_file`), the readers of other ecosystems'
directories (`hanlm.imports`) and the model families (`hanlm.models`, `hanlm.tasks`), and below
everything that loads (train's `init_from`, finetune, eval, generate, mix, export, serve, bench).

Two tables say what is supported:
- `SOURCES`: what a path can be, tried in order; each reader gives (model, config, tokenizer) or, for
  checkpoint directories, a `Checkpoint` that the next table builds from.
- `KINDS`: `model.task` of a checkpoint → the builder of its model.
A new family is one entry in these tables plus its own package.

Loading this module also plugs hanlm's taggers in as word segmenters of the word tokenizer
(`tokenizer.segmenter: CKPT`): `hanlm.data.segmenters` defines the plug, this module fills it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hanlm.checkpoint import (
    ARPA_SUFFIXES,
    Checkpoint,
    CheckpointGone,
    load_checkpoint,
    load_weights,
    read_best,
    resolve_stored,
    selected_on,
    stored_task,
)
from hanlm.config import Config, load_config
from hanlm.data.segmenters import Segment, plug_segmenter_loader
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError, DataError
from hanlm.imports.hf import is_hf_dir, load_hf
from hanlm.mixture_file import is_mixture, manifest_digest, mixture_file, read_mixture
from hanlm.models import build_for_training
from hanlm.models.lora import has_lora, merged_state_dict
from hanlm.models.arpa import read_arpa, tokenizer_for
from hanlm.models.mixture import MixtureLM
from hanlm.models.ngram import NGramLM
from hanlm.tasks.classifier import build_classifier
from hanlm.tasks.ner import EntityTagger
from hanlm.tasks.predict import Classifier
from hanlm.tasks.taggers import LoadedTagger, neural_tagger_of, tagger_of

Loaded = tuple[Any, Config, Tokenizer]  # (model in eval mode, config, tokenizer)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def open_checkpoint(path: str, map_location: str | torch.device = "cpu",
                    note: Callable[[str], None] = _note) -> Checkpoint:
    """The checkpoint at `path`: a hanlm checkpoint directory (verified against its manifest), or a Hugging
    Face model directory read as one at step 0."""
    if is_hf_dir(path):
        return load_hf(path)
    ckpt = load_checkpoint(path, map_location, note)
    if ckpt.config.model.task == "lm" and has_lora(ckpt.weights):
        # A language model continued with train.lora_rank: every reader (eval, generate, serve, export, init_from)
        # gets the plain network with its updates folded in; only the run itself resumes the unfolded form.
        ckpt = dataclasses.replace(ckpt, weights=merged_state_dict(ckpt.weights))
    return ckpt


def resolve_checkpoint(spec: str, note: Callable[[str], None] = _note) -> str:
    """A checkpoint directory from a path that is one (hanlm's or a Hugging Face directory), a checkpoint
    root (its `latest`) or a run directory (its checkpoints)."""
    return spec if is_hf_dir(spec) else resolve_stored(spec, note)


def open_served(spec: str, device: str | torch.device = "cpu", note: Callable[[str], None] = _note) -> Checkpoint:
    """`open_checkpoint(resolve_served(spec))`; when `spec` is a run or checkpoint directory and the checkpoint
    it resolved to is pruned by a running training while it is read, the newest one is resolved and read
    instead (a path to one checkpoint is never swapped for another)."""
    path = resolve_served(spec, note)
    for _ in range(_RETRIES - 1):
        try:
            return open_checkpoint(path, device, note)
        except CheckpointGone as e:
            if path == spec:
                raise
            note(f"note: {e}; reading the newest in {spec} instead")
            path = resolve_served(spec, note)
    return open_checkpoint(path, device, note)


_RETRIES = 3  # a training that saves faster than a checkpoint loads would prune each one found


def resolve_served(spec: str, note: Callable[[str], None] = _note) -> str:
    """`resolve_checkpoint`, except that a run or checkpoint directory gives the run's result rather than its
    latest checkpoint, which only a resume wants: for classifiers and taggers (`hanlm finetune`) the best by dev
    score; for language models the best by the held-out tune split's loss, saying so when it is not the latest.
    A language-model run ranked by val loss (prepared without a tune split) gives its latest, and names its
    best by val loss when that is another: choosing by val would make val scores look better than new text's."""
    path = resolve_checkpoint(spec, note)
    if path == spec or is_hf_dir(path):
        return path
    root, name = path.rstrip("/").rsplit("/", 1)
    best = read_best(root, note)
    if stored_task(path) in ("classify", "tag", "ner"):
        return f"{root}/{best[0]}" if best else path
    if best is None or best[0] == name:
        return path
    if selected_on(f"{root}/{best[0]}") == "tune":
        note(f"note: {spec}: using its best checkpoint by held-out tune loss, {best[0]} ({best[1]:.4f}); its latest "
             f"is {name}: give {root}/{name} to use that one")
        return f"{root}/{best[0]}"
    note(f"note: {spec}: using its latest checkpoint, {name}; its best by val loss is {best[0]} "
         f"({best[1]:.4f}): give {root}/{best[0]} to use that one")
    return path


def require_language_model(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt`, or CheckpointError when it holds a classifier or tagger (`hanlm finetune`) instead of a
    language model."""
    if ckpt.config.model.task == "ner":
        raise CheckpointError(f"{ckpt.path} is an entity recognizer (model.task ner), not a language model: use it "
                              "with `hanlm ner`")
    if ckpt.config.model.task == "tag":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.config.finetune.tagger} tagger for word segmentation "
                              "(model.task tag), not a language model: use it with `hanlm segment` or `hanlm serve` "
                              "(POST /v1/segment)")
    if ckpt.config.model.task != "lm":
        raise CheckpointError(f"{ckpt.path} is a text classifier (model.task {ckpt.config.model.task}, labels "
                              f"{', '.join(ckpt.config.finetune.labels)}), not a language model: use it with "
                              "`hanlm classify` or `hanlm serve` (POST /v1/classify)")
    return ckpt


def _language_model(ckpt: Checkpoint, device: str | torch.device) -> torch.nn.Module:
    if ckpt.ngram is not None:
        return ckpt.ngram.eval()
    # The weights already hold any pretrained vectors the run started from. An ELECTRA checkpoint loads whole
    # (generator, discriminator, RTD head): what evaluating its objective needs.
    cfg = dataclasses.replace(ckpt.config, model=dataclasses.replace(ckpt.config.model, vectors=None))
    model = build_for_training(cfg, ckpt.tokenizer.vocab_size)
    load_weights(model, ckpt.weights, ckpt.path)
    return model.to(device).eval()


def _classifier(ckpt: Checkpoint, device: str | torch.device) -> torch.nn.Module:
    model = build_classifier(ckpt.config, ckpt.tokenizer.vocab_size)
    load_weights(model, ckpt.weights, ckpt.path)
    return model.to(device).eval()


def _entity_tagger(ckpt: Checkpoint, device: str | torch.device) -> EntityTagger:
    ft = ckpt.config.finetune
    if ft.tagger == "neural":
        if not ft.labels:
            raise CheckpointError(f"{ckpt.path}/config.yaml lists no tags (finetune.labels)")
        return EntityTagger(neural_tagger_of(ckpt, device), ft.ner_scheme, "neural")
    return EntityTagger.from_checkpoint(ft.labels, ft.ner_scheme, ckpt.weights, ckpt.path)


# model.task → the builder of a checkpoint's model (in eval mode, on the device).
KINDS: dict[str, Callable[[Checkpoint, str | torch.device], Any]] = {
    "lm": _language_model,
    "classify": _classifier,
    "tag": tagger_of,
    "ner": _entity_tagger,
}


def model_of(ckpt: Checkpoint, device: str | torch.device = "cpu") -> Any:
    """The loaded checkpoint's model in eval mode, built by its kind (`KINDS`): an n-gram or a network for a
    language model, a `SequenceClassifier`, or a `Tagger`."""
    build = KINDS.get(ckpt.config.model.task)
    if build is None:
        raise CheckpointError(f"{ckpt.path}/config.yaml: model.task {ckpt.config.model.task!r} is not one hanlm "
                              f"loads ({', '.join(KINDS)})")
    return build(ckpt, device)


def _from_arpa(spec: str, device: str | torch.device) -> Loaded:
    """An ARPA file written by any tool: its words become the vocabulary (see `tokenizer_for`)."""
    model, words = read_arpa(spec)
    cfg = load_config(overrides=["model.arch=ngram", f"model.order={model.order}"])
    return model.eval(), cfg, tokenizer_for(words)


def load_mixture(spec: str, device: str | torch.device = "cpu") -> Loaded:
    """(mixture in eval mode, the neural part's config with model.arch mix, tokenizer), after checking
    that neither part has changed since the mixture was tuned."""
    record, path = read_mixture(spec), mixture_file(spec)
    for part in ("neural", "ngram"):
        saved = record[part].get("manifest_sha256")
        if saved is not None and manifest_digest(record[part]["path"]) != saved:
            raise CheckpointError(f"{path}: its {part} part {record[part]['path']} has changed (or is gone) since the "
                                  "mixture was tuned; run hanlm mix again")
    neural, cfg, tokenizer = load_for_inference(record["neural"]["path"], device)
    ngram, _, ngram_tokenizer = load_for_inference(record["ngram"]["path"], device)
    if not isinstance(ngram, NGramLM) or isinstance(neural, NGramLM):
        raise CheckpointError(f"{path}: neural.path must be a gpt or lstm checkpoint and ngram.path an n-gram one")
    if tokenizer.fingerprint() != ngram_tokenizer.fingerprint():
        raise CheckpointError(f"{path}: the parts use different tokenizers ({record['neural']['path']}/tokenizer.json "
                              f"and {record['ngram']['path']}/tokenizer.json)")
    try:
        model = MixtureLM(neural, ngram, [float(w) for w in record["weights"]])
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="mix"))
    return model.to(device).eval(), cfg, tokenizer


# What a path given for inference can be, tried in order (a checkpoint directory of any ecosystem last).
SOURCES: list[tuple[Callable[[str], bool], Callable[[str, str | torch.device], Loaded]]] = [
    (is_mixture, load_mixture),
    (lambda spec: spec.endswith(ARPA_SUFFIXES), _from_arpa),
]


def load_for_inference(spec: str, device: str | torch.device = "cpu", *, tasks: Sequence[str] = ("lm",)) -> Loaded:
    """(model in eval mode, config, tokenizer) from a checkpoint (hanlm's or a Hugging Face directory), a
    checkpoint root or run directory, a mixture (`hanlm mix`), or an ARPA file. A checkpoint whose
    model.task is not in `tasks` (a classifier, by default) is refused by name."""
    for matches, read in SOURCES:
        if matches(spec):
            return read(spec, device)
    ckpt = open_served(spec, device)
    if ckpt.config.model.task not in tasks:
        require_language_model(ckpt)
    return model_of(ckpt, device), ckpt.config, ckpt.tokenizer


def load_classifier(spec: str, device: str | torch.device = "cpu") -> Classifier:
    """The classifier in a checkpoint written by `hanlm finetune`: a step directory, or its checkpoints or
    run directory (then the best checkpoint by dev accuracy); CheckpointError when it holds a language
    model instead."""
    ckpt = open_served(spec, device)
    if ckpt.config.model.task != "classify":
        raise CheckpointError(f"{ckpt.path} is a language model (model.task {ckpt.config.model.task}), not a "
                              "classifier: fine-tune it first with `hanlm finetune`")
    return Classifier(model_of(ckpt, device), ckpt.config, ckpt.tokenizer)


def load_entity_tagger(spec: str, device: str | torch.device = "cpu") -> tuple[EntityTagger, Config, str]:
    """The entity tagger of a checkpoint of `hanlm finetune --task ner` (a step directory, or its checkpoints or
    run directory: then the best by dev F1), its config and its path."""
    ckpt = open_served(spec, device)
    if ckpt.config.model.task != "ner":
        raise CheckpointError(f"{ckpt.path} is not an entity recognizer (model.task {ckpt.config.model.task}): "
                              "train one with `hanlm finetune --task ner`")
    return model_of(ckpt, device), ckpt.config, ckpt.path


def load_tagger(spec: str, device: str | torch.device = "cpu") -> LoadedTagger:
    """The tagger in a checkpoint of `hanlm finetune --task tag` (a step directory, or its checkpoints or
    run directory: then the best by dev F1)."""
    ckpt = open_served(spec, device)
    return LoadedTagger(tagger_of(ckpt, device), ckpt.config, ckpt.tokenizer, ckpt.path)


@functools.lru_cache(maxsize=4)
def tagger_segmenter(spec: str) -> Segment:
    """The word segmenter of the tagger checkpoint `spec`, for the word tokenizer: texts → their words.
    A module-level function, so that prepare's worker processes receive it by name."""
    try:
        tagger = load_tagger(spec).tagger
    except CheckpointError as e:
        raise DataError(f"tokenizer.segmenter {spec!r} is not a usable tagger: {e}") from None
    return lambda texts: [s.words for s in tagger.segment(texts)]


plug_segmenter_loader(tagger_segmenter)
