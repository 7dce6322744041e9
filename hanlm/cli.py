"""The `hanlm` command: one entry point whose verbs follow the pipeline. This module builds the parser
and maps each verb to its function in `hanlm.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hanlm import __version__
from hanlm.argtypes import bounded_int, positive_int
from hanlm.bench import SUITES
from hanlm.commands import (
    cmd_bench,
    cmd_classify,
    cmd_config_keys,
    cmd_config_show,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_generate,
    cmd_mix,
    cmd_ner,
    cmd_prepare,
    cmd_segment,
    cmd_serve,
    cmd_train,
)
from hanlm.config import config_options
from hanlm.data.offdomain import OFF_DOMAIN, OFF_DOMAIN_TEXTS
from hanlm.errors import HanlmError
from hanlm.limits import CONTEXT_MAX, NPROC_MAX
from hanlm.train.run import RESTART_HELP, STOP_AFTER_HELP


def _decoding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", choices=["none", "ngram", "prompt"], help="draft tokens for the model to check "
                   "several per forward: with an n-gram model (--draft-model) or from the prompt and output so far "
                   "(default: generate.speculative)")
    p.add_argument("--draft-model", metavar="NGRAM", help="n-gram checkpoint or ARPA file over the same tokenizer, "
                   "for --speculative ngram (default: generate.draft_model)")
    p.add_argument("--draft-tokens", type=int, metavar="K", help="most tokens drafted per forward (default: "
                   "generate.draft_tokens)")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="compile the decoding step with torch.compile: "
                   "the same tokens, faster after seconds to a minute of compiling (default: generate.compile, auto: "
                   "on for a GPU)")


def _pipeline_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """prepare, train, eval, generate: the language-model pipeline."""
    p = verbs.add_parser("prepare", parents=[common], help="read sources, train or load the tokenizer, write "
                         "token shards", description="Read the data sources (data.*), train the tokenizer "
                         "(tokenizer.*) or load tokenizer.path, and write train/val token shards with meta.json. "
                         "Reuses existing shards when sources and settings are unchanged.")
    p.add_argument("--out", metavar="DIR", help="output directory (default: data.prepared_dir, else "
                   "$HANLM_HOME/prepared/<sources>-<tokenizer>-<settings hash>)")
    p.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    p.add_argument("--list", action="store_true", help="list the directories under $HANLM_HOME/prepared with their "
                   "size, tokenizer and tokens (* marks the one this config uses), and prepare nothing")
    p.add_argument("--clean", nargs="+", metavar="NAME", help="delete these directories under "
                   "$HANLM_HOME/prepared (names as --list shows them), `stale` for unfinished ones, or `all`; "
                   "prepares nothing")
    p.add_argument("--launcher", choices=("local", "spark"), default="local", help="spark: read the source files "
                   "and encode in Spark tasks (under spark-submit: the cluster's; else local mode), for corpora "
                   "beyond one machine; the shards are byte for byte those of a local prepare")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print meta.json and the directory as JSON")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("train", parents=[common], help="train a model (the main job: no arguments trains the demo)",
                         description="Prepare the data if needed, then train model.* on data.* with train.*: "
                         "evaluate every eval.every_steps, checkpoint every checkpoint.every_steps, and at the end "
                         "evaluate the whole val split, write report.md and print sample continuations. Ctrl-C "
                         "(or SIGTERM) finishes the current step, saves a checkpoint and exits 0.")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the latest good checkpoint of this run "
                   "(auto) or from a checkpoint path (default: checkpoint.resume)")
    p.add_argument("--restart-if-damaged", action="store_true", help=RESTART_HELP)
    p.add_argument("--stop-after", type=positive_int, metavar="N", help=STOP_AFTER_HELP)
    launcher = p.add_argument_group("distributed launch (torchrun)")
    launcher.add_argument("--nproc", type=bounded_int(1, NPROC_MAX), default=1, metavar="N",
                          help="workers on this machine (default 1)")
    launcher.add_argument("--nnodes", type=bounded_int(1, 1 << 20), default=1, metavar="M",
                          help="machines in the job (default 1)")
    launcher.add_argument("--node-rank", type=bounded_int(0, 1 << 20), default=0, metavar="R",
                          help="this machine's index, 0..M-1")
    launcher.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address, the same on every "
                          "machine (needed with --nnodes > 1)")
    launcher.add_argument("--max-restarts", type=bounded_int(0, 1 << 20), default=0, metavar="K",
                          help="restart the workers up to K times when one fails; each resumes from the latest "
                          "checkpoint")
    launcher.add_argument("--launcher", choices=("torchrun", "spark"), default="torchrun",
                          help="start the workers with torchrun (default) or with Spark's TorchDistributor, "
                          "e.g. under spark-submit on YARN or Kubernetes (no elastic restart)")
    launcher.add_argument("--spark-local", action="store_true",
                          help="with --launcher spark: run the workers on the driver, not on executors")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", help="evaluate a checkpoint: loss, perplexity per token and character, BPC",
                         description="Evaluate a checkpoint (a step directory, or a checkpoint directory: its "
                         "latest) on the val split it was trained with, or on other text.")
    p.add_argument("checkpoint", help="checkpoint path, checkpoint directory, mixture directory or ARPA file")
    p.add_argument("--data", metavar="SPEC", action="append",
                   help="evaluate on this text instead: a file, directory, glob, URL or built-in corpus, read with "
                   "the checkpoint's data.* settings (repeatable)")
    p.add_argument("--distinct", action="store_true", help="with --data: score each distinct text once, in the "
                   "order first seen (duplicates would count one text's loss several times); `--data chn-reviews "
                   "--distinct` is the off-domain figure hanlm mix reports, on all 17,408 distinct reviews")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stride", type=bounded_int(1, CONTEXT_MAX), metavar="N", help="sliding windows: the model's "
                   "train.block_size windows move by N tokens and score their last N, so every token sees at least "
                   "block_size − N tokens of context (default: the checkpoint's eval.stride, or windows side by side)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("generate", help="continue a prompt with a trained model, streamed to stdout",
                         description="Sample a continuation of --prompt; defaults come from the checkpoint's "
                         "generate.* config.")
    p.add_argument("checkpoint", help="checkpoint path, checkpoint directory, mixture directory or ARPA file")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-tokens", type=int, help="tokens to generate")
    p.add_argument("--temperature", type=float, help="0 for greedy")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold; 1 = off")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    _decoding_flags(p)
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--verbose", "-v", action="store_true", help="report tokens, finish reason and drafts kept on "
                   "stderr")
    p.set_defaults(func=cmd_generate)


def _serving_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """serve and mix: serving a model, combining two."""
    p = verbs.add_parser("serve", parents=[common], help="serve a checkpoint over an OpenAI-compatible HTTP API",
                         description="Serve a checkpoint (or an ARPA file) with FastAPI and uvicorn: /v1/completions, "
                         "/v1/chat/completions, /v1/models, /v1/score, /tokenize, /detokenize, /health, /metrics "
                         "and a playground page at /; a classifier from hanlm finetune answers POST /v1/classify "
                         "instead. Concurrent requests are decoded together (continuous batching). Defaults come "
                         "from the serve.* keys.")
    p.add_argument("checkpoint", help="checkpoint path, checkpoint directory, mixture directory or ARPA file")
    p.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1; without an API key, loopback "
                   "only unless given here)")
    p.add_argument("--port", type=int, help="TCP port (default: serve.port, 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every endpoint but /health and the "
                   "playground page / (default: $HANLM_API_KEY, which keeps the key out of `ps`: prefer it). An "
                   "empty key is an error; with no key at all the server binds loopback only unless --host is given")
    p.add_argument("--max-batch", type=int, metavar="N", help="sequences decoded together (default: serve.max_batch)")
    p.add_argument("--max-queue", type=int, metavar="N", help="waiting requests before 429 (default: serve.max_queue)")
    p.add_argument("--model-name", help="the model's id in the API (default: the run directory's name)")
    p.add_argument("--engine", choices=["torch", "llama.cpp"], help="what computes a gpt's tokens: torch, or "
                   "llama.cpp on the checkpoint's GGUF (cached under $HANLM_HOME/gguf; pip install 'hanlm[llamacpp]') "
                   "(default: serve.engine, torch)")
    _decoding_flags(p)
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("mix", help="combine a neural and an n-gram checkpoint into one model",
                         description="Interpolate the next-token distributions of a neural checkpoint and an n-gram "
                         "checkpoint (the same tokenizer), the neural weight depending on how much context the "
                         "n-gram knows; the weights are tuned on the prepared tune split (data.tune_fraction), never the val split. "
                         "Writes OUT/mixture.json, which eval, generate and serve take like a checkpoint, and prints "
                         "the val BPC of the n-gram, the network and the mixture, and their BPC on off-domain text "
                         "(--off-domain).")
    p.add_argument("neural", help="the gpt or lstm checkpoint (path or checkpoint directory)")
    p.add_argument("ngram", nargs="?", help="the n-gram checkpoint, trained on the same prepared data (default: count "
                   "one of --order on the neural run's data into OUT/ngramN, seconds)")
    p.add_argument("--order", type=int, default=5, choices=range(1, 7), metavar="N",
                   help="order of the n-gram to count when none is given (default 5)")
    p.add_argument("--out", required=True, help="directory for mixture.json")
    p.add_argument("--tune-tokens", type=int, default=100_000, metavar="N",
                   help="most tokens of the tune split to tune on (default 100000; without a tune split, "
                   "the last tokens of the train split)")
    p.add_argument("--no-buckets", action="store_true",
                   help="one weight for every context instead of one per n-gram context length")
    p.add_argument("--no-eval", action="store_true", help="skip scoring the parts and the mixture (val split and "
                   "off-domain text): tune and write mixture.json only")
    p.add_argument("--off-domain", default=OFF_DOMAIN, metavar="SPEC", help="also score the three on the distinct "
                   "texts of this source (file, directory, glob, URL or built-in corpus), read with the neural "
                   f"run's data.* settings: text unlike the training data; none skips it (default {OFF_DOMAIN}, "
                   "product reviews)")
    p.add_argument("--off-domain-texts", type=int, default=OFF_DOMAIN_TEXTS, metavar="N",
                   help=f"score N of those distinct texts, evenly spaced (default {OFF_DOMAIN_TEXTS}, a few seconds "
                   "for the demo; 0: all, 17,408 for chn-reviews; hanlm eval CKPT --data chn-reviews --distinct "
                   "scores all of them for any checkpoint)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_mix)


def _texts_flags(p: argparse.ArgumentParser, verb: str, what: str) -> None:
    """--text and --data of the verbs that run a task model over texts (classify, segment, ner)."""
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help=f"a text to {verb} (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help=f"{verb} {what} this file, directory, glob, URL or built-in corpus (repeatable)")


def _task_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """finetune, classify, segment: the understanding tasks."""
    p = verbs.add_parser("finetune", parents=[common], help="fine-tune a trained language model for text "
                         "classification or word segmentation / POS tagging; train HMM and CRF taggers",
                         description="classify (default): add a classification head to a gpt, lstm, encoder or "
                         "bert checkpoint, or a Hugging Face directory (Qwen, Llama, Mistral, a Chinese BERT), "
                         "and train it on labelled text (finetune.data: built-in chn-reviews, or .jsonl/.csv/.parquet "
                         "with finetune.text_field and finetune.label_field). --task tag: train a character tagger "
                         "for segmentation (and POS tags with --scheme bmes-pos) on tagged text (default the built-in "
                         "people-daily-1998-tagged; finetune.tag_format): a neural head on the checkpoint, or with "
                         "--tagger hmm|crf a traditional tagger that needs no checkpoint. --task ner: an entity "
                         "tagger (person, location, organisation; default the built-in people-daily-1998-ner): a "
                         "neural head on the checkpoint, or the crf without one. The data is split "
                         "train/dev/test by a hash of each distinct text. Evaluates the dev split every "
                         "finetune.eval_every_steps steps and checkpoints there; at the end scores the best dev "
                         "checkpoint on the test split and writes report.md and results.json in finetune.run_dir. "
                         "Ctrl-C saves and exits; --resume auto continues exactly.")
    p.add_argument("checkpoint", nargs="?", help="the pretrained checkpoint, run directory or Hugging Face "
                   "directory (sets finetune.init_from); not for --tagger hmm|crf")
    p.add_argument("--task", choices=["classify", "tag", "ner"], help="what to train for (sets finetune.task; "
                   "default classify; ner: a neural entity tagger on the checkpoint, or the crf without one)")
    p.add_argument("--tagger", choices=["neural", "hmm", "crf"], help="the tagger (sets finetune.tagger and implies "
                   "--task tag)")
    p.add_argument("--scheme", choices=["bmes", "bmes-pos"], help="character tags: segmentation only, or joint "
                   "with POS (sets finetune.tag_scheme)")
    p.add_argument("--scratch", action="store_true", help="the checkpoint's shape and tokenizer with random weights "
                   "(sets finetune.from_scratch): the baseline that measures pretraining")
    p.add_argument("--resume", metavar="auto|PATH", help="continue this run from its latest good checkpoint (auto) "
                   "or from a checkpoint path")
    p.add_argument("--nproc", type=bounded_int(1, NPROC_MAX), default=1, metavar="N",
                   help="workers on this machine, DDP (default 1)")
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("classify", help="label texts with a fine-tuned classifier (JSON lines out)",
                         description="Print one JSON line per text: the text, its label and every label's "
                         "probability. With --data and --label-field, also compare with the gold labels and print "
                         "accuracy, macro-F1 and the confusion matrix on stderr.")
    p.add_argument("checkpoint", help="a checkpoint of hanlm finetune (step directory, checkpoints or run directory)")
    _texts_flags(p, "classify", "the texts of")
    p.add_argument("--label-field", metavar="FIELD", help="with --data: the field holding gold labels, to score "
                   "against")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_classify)

    p = verbs.add_parser("segment", help="segment text into words (and POS-tag it) with a trained tagger",
                         description="Print each text's words, separated by two spaces (--format words), or as "
                         "word/TAG tokens (--format slash) or a token per line (--format conll) when the tagger "
                         "tags POS. --data reads one text per line; with --gold the files hold gold segmentation "
                         "(any format of finetune.tag_format), their text is segmented and SIGHAN precision, "
                         "recall and F1 go to stderr.")
    p.add_argument("checkpoint", help="a tagger from hanlm finetune --task tag (step directory, checkpoints or run "
                   "directory: then its best by dev F1)")
    _texts_flags(p, "segment", "every line of")
    p.add_argument("--format", choices=["words", "slash", "conll"], help="output format (default: slash for a POS "
                   "tagger, else words)")
    p.add_argument("--gold", action="store_true", help="--data holds gold words: segment their text and score")
    p.add_argument("--gold-format", default="auto", choices=["auto", "words", "slash", "conll"],
                   help="format of the --gold files (default auto)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_segment)

    p = verbs.add_parser("ner", help="find person, location and organisation names with a trained entity tagger",
                         description="Print one JSON line per text: the text and its entities (text, type, start, "
                         "end; character offsets, end excluded). --data reads one text per line; with --gold the "
                         "files hold gold entities (finetune.ner_format: jsonl or conll, see --format) and "
                         "entity-level precision, recall and F1 per type (exact span and type, as conlleval counts) "
                         "go to stderr.")
    p.add_argument("checkpoint", help="an entity tagger from hanlm finetune --task ner (step directory, checkpoints "
                   "or run directory: then its best by dev F1)")
    _texts_flags(p, "tag", "every line of")
    p.add_argument("--gold", action="store_true", help="--data holds gold entities: tag their texts and score")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "conll"],
                   help="format of the --gold files (default auto: by the file name; built-in corpora are jsonl)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_ner)


def _tool_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """export, bench and config."""
    p = verbs.add_parser("export", help="write a checkpoint in another ecosystem's format (Hugging Face, GGUF)",
                         description="--format hf: a LlamaForCausalLM directory (config.json, model.safetensors, "
                         "generation_config.json, tokenizer.json for PreTrainedTokenizerFast) that transformers, "
                         "vLLM and TGI load. --format gguf: one GGUF file for llama.cpp. gpt checkpoints with "
                         "char or bpe tokenizers.")
    p.add_argument("checkpoint", help="a gpt checkpoint, checkpoint directory or run directory")
    p.add_argument("out", help="the directory (hf) or .gguf file (gguf) to write")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="the format (default hf)")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="gguf: the matrices' type "
                   "(norms stay f32; default f32)")
    p.add_argument("--force", action="store_true", help="hf: replace an existing directory that is not empty "
                   "(never the checkpoint being exported, nor one holding it)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("bench", help="measure speed and memory against the machine's limit and peer tools",
                         description="Run benchmark suites side by side with their peers (transformers, kenlm, "
                         "NLTK: pip install -e '.[bench]') and the measured matmul peak; write "
                         "<out>/<date>-<host>.json, a Markdown report and PNG plots.")
    p.add_argument("suites", nargs="*", default=["all"], choices=["all", *SUITES], metavar="SUITE",
                   help=f"{', '.join(SUITES)} or all (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: about a minute on 2 CPU cores instead of five")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory (default bench/results)")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("config", help="show the resolved config or the documented keys",
                         description="Inspect configuration.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("show", parents=[common], help="print the resolved config, derived values included",
                       description="Print the config after defaults, --config and --set, with derived values.")
    s.add_argument("--json", action="store_true", help="JSON instead of YAML")
    s.set_defaults(func=cmd_config_show)
    s = sub.add_parser("keys", help="print every key with type, default and meaning (Markdown)",
                       description="Print the table of config keys that docs/guide/config.md shows.")
    s.set_defaults(func=cmd_config_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hanlm", description="Language models for Chinese text: prepare data, "
                                     "train, evaluate and generate, driven by one config.")
    parser.add_argument("--version", action="version", version=f"hanlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    common = config_options()
    _pipeline_verbs(verbs, common)
    _serving_verbs(verbs, common)
    _task_verbs(verbs, common)
    _tool_verbs(verbs, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HanlmError as e:
        print(f"hanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hanlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
