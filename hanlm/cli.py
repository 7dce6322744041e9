"""The `hanlm` command: one entry point whose verbs follow the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hanlm import __version__
from hanlm.bench import SUITES
from hanlm.config import Config, config_options, keys_markdown, load_config
from hanlm.errors import ConfigError, HanlmError
from hanlm.train.run import RESTART_HELP, STOP_AFTER_HELP


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hanlm.data.prepare import prepare
    from hanlm.data.prepared_dirs import manage

    cfg = _load(args)
    if args.list or args.clean:
        print(manage(cfg, clean=args.clean or [], show=args.list))
        return 0
    result = prepare(cfg, args.out, force=args.force, progress=not args.no_progress and cfg.log.progress,
                     launcher=args.launcher)
    if args.json:
        print(json.dumps({"directory": str(result.directory), "reused": result.reused, **result.meta},
                         ensure_ascii=False, indent=2))
    else:
        print(result.summary())
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse reports anything else by option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _worker_args(config: str | None, overrides: Sequence[str], resume: str | None) -> list[str]:
    """The options a torchrun worker gets: the same config, overrides and resume as this command."""
    return [*(["--config", config] if config else []), *(a for kv in overrides for a in ("--set", kv)),
            *(["--resume", resume] if resume else [])]


def cmd_train(args: argparse.Namespace) -> int:
    distributed = args.nproc > 1 or args.nnodes > 1 or args.max_restarts > 0
    if not distributed and args.launcher == "torchrun":
        from hanlm.train.run import train

        return train(_load(args), args.resume, restart_if_damaged=args.restart_if_damaged,
                     stop_after=args.stop_after)
    _load(args)  # report config mistakes here, once, not from every worker
    worker_args = [*_worker_args(args.config, args.overrides, args.resume),
                   *(["--restart-if-damaged"] if args.restart_if_damaged else []),
                   *(["--stop-after", str(args.stop_after)] if args.stop_after is not None else [])]
    if args.launcher == "spark":
        from hanlm.train.spark import launch_on_spark

        if args.nnodes > 1 or args.max_restarts > 0:
            raise ConfigError("--launcher spark places workers itself and does no elastic restart: drop --nnodes "
                              "and --max-restarts (rerun with --resume auto after a failure)")
        return launch_on_spark(worker_args, nproc=args.nproc, local=args.spark_local)
    from hanlm.train.distributed import launch

    return launch(worker_args, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                  rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts)


def cmd_eval(args: argparse.Namespace) -> int:
    from hanlm.eval import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device, stride=args.stride)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hanlm.checkpoint import load_for_inference
    from hanlm.generate import Generation, SamplingParams, generate
    from hanlm.speculative import speculation_from_config

    model, cfg, tokenizer = load_for_inference(args.checkpoint, args.device or "cpu")
    params = SamplingParams.from_config(cfg.generate, max_tokens=args.max_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)
    speculation = speculation_from_config(cfg.generate, tokenizer, args.speculative, args.draft_model,
                                          args.draft_tokens)
    result = Generation()
    print(args.prompt, end="", flush=True)
    try:
        for piece in generate(model, tokenizer, args.prompt, params, result=result, speculation=speculation):
            print(piece, end="", flush=True)
    except ValueError as e:
        raise HanlmError(str(e)) from None
    print()
    if args.verbose:
        drafted = ""
        if speculation is not None:
            s = speculation.stats
            drafted = (f", {s.accepted} of {s.proposed} drafted tokens kept ({s.acceptance_rate:.0%}) in {s.steps} "
                       f"forwards, {s.draft_s * 1000:.0f} ms drafting")
        print(f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}{drafted}]", file=sys.stderr)
    return 0


def _speculation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", choices=["none", "ngram", "prompt"], help="draft tokens for the model to check "
                   "several per forward: with an n-gram model (--draft-model) or from the prompt and output so far "
                   "(default: generate.speculative)")
    p.add_argument("--draft-model", metavar="NGRAM", help="n-gram checkpoint or ARPA file over the same tokenizer, "
                   "for --speculative ngram (default: generate.draft_model)")
    p.add_argument("--draft-tokens", type=int, metavar="K", help="most tokens drafted per forward (default: "
                   "generate.draft_tokens)")


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from hanlm.serve.app import serve

    cfg = _load(args)
    s = cfg.serve
    api_key = args.api_key or os.environ.get("HANLM_API_KEY") or None
    host = args.host or s.host
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"hanlm: warning: serving on {host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    serve(args.checkpoint, host=host, port=args.port or s.port, api_key=api_key, model_name=args.model_name,
          max_batch=args.max_batch or s.max_batch, max_queue=args.max_queue or s.max_queue,
          max_body_bytes=s.max_body_bytes, max_json_depth=s.max_json_depth, body_timeout_s=s.body_timeout_s,
          metrics_public=s.metrics_public, device=args.device or "cpu",
          draft=(cfg.generate, args.speculative, args.draft_model, args.draft_tokens))
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from hanlm.mix import build_mixture, summary

    if args.tune_tokens < 1000:
        raise ConfigError(f"--tune-tokens must be at least 1000, got {args.tune_tokens}")
    report = build_mixture(args.neural, args.ngram, args.out, order=args.order, buckets=not args.no_buckets,
                           tune_tokens=args.tune_tokens, evaluate_val=not args.no_eval, device=args.device or "cpu")
    print(summary(report))
    print(f"mixture: {args.out}/mixture.json (use it like a checkpoint: hanlm eval|generate|serve {args.out})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    flags = {"finetune.task": args.task, "finetune.tagger": args.tagger, "finetune.tag_scheme": args.scheme}
    overrides = [*([f"finetune.init_from={args.checkpoint}"] if args.checkpoint else []),
                 *(["finetune.from_scratch=true"] if args.scratch else []),
                 *(f"{k}={v}" for k, v in flags.items() if v), *args.overrides]
    if args.tagger and not args.task:
        overrides.insert(0, "finetune.task=tag")
    cfg = load_config(args.config, overrides)
    if cfg.finetune.task == "tag" and cfg.finetune.tagger != "neural":
        if args.nproc > 1 or args.resume:
            raise ConfigError(f"finetune.tagger {cfg.finetune.tagger} trains in one process, in one pass: drop "
                              "--nproc and --resume")
        from hanlm.tasks.finetune import print_result
        from hanlm.tasks.taggers import fit_counted

        print_result(fit_counted(cfg))
        return 0
    if args.nproc <= 1:
        from hanlm.tasks.finetune import Finetuner, print_result

        print_result(Finetuner(cfg, resume=args.resume).run())
        return 0
    from hanlm.train.distributed import launch

    return launch(_worker_args(args.config, overrides, args.resume), nproc=args.nproc, nnodes=1, node_rank=0,
                  rdzv_endpoint=None, max_restarts=0, module="hanlm.tasks")


def _texts_or_data(args: argparse.Namespace) -> None:
    """`hanlm classify` and `hanlm segment` read texts from --text or from --data, exactly one of them."""
    if bool(args.text) == bool(args.data):
        raise ConfigError("give the texts with --text (repeatable) or the file(s) with --data, one of the two")


def cmd_classify(args: argparse.Namespace) -> int:
    from hanlm.tasks.predict import classify_file, load_classifier

    _texts_or_data(args)
    if args.label_field and not args.data:
        raise ConfigError("--label-field reads gold labels from --data files; it does not apply to --text")
    classifier = load_classifier(args.checkpoint, args.device or "cpu")
    scores = None
    if args.text:
        records = [{"text": t, **r} for t, r in zip(args.text, classifier.classify(args.text))]
    else:
        records, scores = classify_file(classifier, args.data, label_field=args.label_field)
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    if scores is not None:
        print(f"{scores.summary()}\n{scores.confusion_table()}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hanlm.export import export

    print(f"wrote {export(args.checkpoint, args.format, args.out, args.dtype)}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from hanlm.data.tagged import TaggedSentence, format_sentence
    from hanlm.tasks.taggers import load_tagger, segment_file

    _texts_or_data(args)
    if args.gold and not args.data:
        raise ConfigError("--gold scores --data files that hold gold segmentation; it does not apply to --text")
    loaded = load_tagger(args.checkpoint, args.device or "cpu")
    out_format = args.format or ("slash" if loaded.tagger.with_pos else "words")
    if out_format != "words" and not loaded.tagger.with_pos:
        raise ConfigError(f"--format {out_format} writes POS tags, and {loaded.path} segments only "
                          f"(tag_scheme {loaded.config.finetune.tag_scheme}); use --format words")
    print(f"{loaded.path}: {loaded.description}", file=sys.stderr)
    if args.text:
        sentences, scores = iter(loaded.tagger.segment(args.text)), (lambda: None)
    else:
        sentences, scores = segment_file(loaded, args.data, args.gold_format, gold=args.gold)
    for sentence in sentences:
        print(format_sentence(TaggedSentence(sentence.words, sentence.tags), out_format))
    if scores() is not None:
        print(scores().summary(), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hanlm.bench.harness import missing_peers, run

    suites = list(SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    missing = missing_peers(suites)
    if missing:
        raise HanlmError(f"the benchmark peers {', '.join(missing)} are not installed: pip install -e '.[bench]'")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HanlmError("--device cuda: no CUDA device is available here; use --device cpu")
    command = " ".join(["hanlm bench", *suites, "--device", args.device, *(["--quick"] if args.quick else [])])
    try:
        run(suites, args.device, args.quick, args.out, command=command)
    except RuntimeError as e:
        raise HanlmError(str(e)) from None
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    text = json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2) + "\n" if args.json else cfg.to_yaml()
    print(text, end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    print(keys_markdown(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hanlm", description="Language models for Chinese text: prepare data, "
                                     "train, evaluate and generate, driven by one config.")
    parser.add_argument("--version", action="version", version=f"hanlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    common = config_options()

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
    launcher.add_argument("--nproc", type=int, default=1, metavar="N", help="workers on this machine (default 1)")
    launcher.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines in the job (default 1)")
    launcher.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's index, 0..M-1")
    launcher.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address, the same on every "
                          "machine (needed with --nnodes > 1)")
    launcher.add_argument("--max-restarts", type=int, default=0, metavar="K",
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
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stride", type=int, metavar="N", help="sliding windows: the model's train.block_size windows "
                   "move by N tokens and score their last N, so every token sees at least block_size − N tokens of "
                   "context (default: the checkpoint's eval.stride, or windows side by side)")
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
    _speculation_flags(p)
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--verbose", "-v", action="store_true", help="report tokens, finish reason and drafts kept on "
                   "stderr")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("serve", parents=[common], help="serve a checkpoint over an OpenAI-compatible HTTP API",
                         description="Serve a checkpoint (or an ARPA file) with FastAPI and uvicorn: /v1/completions, "
                         "/v1/chat/completions, /v1/models, /v1/score, /tokenize, /detokenize, /health, /metrics "
                         "and a playground page at /; a classifier from hanlm finetune answers POST /v1/classify "
                         "instead. Concurrent requests are decoded together (continuous batching). Defaults come "
                         "from the serve.* keys.")
    p.add_argument("checkpoint", help="checkpoint path, checkpoint directory, mixture directory or ARPA file")
    p.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: serve.port, 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every endpoint but /health and the "
                   "playground page / (default: $HANLM_API_KEY, which keeps the key out of `ps`: prefer it; "
                   "none: no key)")
    p.add_argument("--max-batch", type=int, metavar="N", help="sequences decoded together (default: serve.max_batch)")
    p.add_argument("--max-queue", type=int, metavar="N", help="waiting requests before 429 (default: serve.max_queue)")
    p.add_argument("--model-name", help="the model's id in the API (default: the run directory's name)")
    _speculation_flags(p)
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("mix", help="combine a neural and an n-gram checkpoint into one model",
                         description="Interpolate the next-token distributions of a neural checkpoint and an n-gram "
                         "checkpoint (the same tokenizer), the neural weight depending on how much context the "
                         "n-gram knows; the weights are tuned on held-out training text, never the val split. "
                         "Writes OUT/mixture.json, which eval, generate and serve take like a checkpoint.")
    p.add_argument("neural", help="the gpt or lstm checkpoint (path or checkpoint directory)")
    p.add_argument("ngram", nargs="?", help="the n-gram checkpoint, trained on the same prepared data (default: count "
                   "one of --order on the neural run's data into OUT/ngramN, seconds)")
    p.add_argument("--order", type=int, default=5, choices=range(1, 7), metavar="N",
                   help="order of the n-gram to count when none is given (default 5)")
    p.add_argument("--out", required=True, help="directory for mixture.json")
    p.add_argument("--tune-tokens", type=int, default=100_000, metavar="N",
                   help="held-out tokens at the end of the train split to tune on (default 100000)")
    p.add_argument("--no-buckets", action="store_true",
                   help="one weight for every context instead of one per n-gram context length")
    p.add_argument("--no-eval", action="store_true", help="skip scoring the parts and the mixture on the val split")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_mix)

    p = verbs.add_parser("finetune", parents=[common], help="fine-tune a trained language model for text "
                         "classification or word segmentation / POS tagging; train HMM and CRF taggers",
                         description="classify (default): add a classification head to a gpt or lstm checkpoint "
                         "and train it on labelled text (finetune.data: built-in chn-reviews, or .jsonl/.csv/.parquet "
                         "with finetune.text_field and finetune.label_field). --task tag: train a character tagger "
                         "for segmentation (and POS tags with --scheme bmes-pos) on tagged text (default the built-in "
                         "people-daily-1998-tagged; finetune.tag_format): a neural head on the checkpoint, or with "
                         "--tagger hmm|crf a traditional tagger that needs no checkpoint. The data is split "
                         "train/dev/test by a hash of each distinct text. Evaluates the dev split every "
                         "finetune.eval_every_steps steps and checkpoints there; at the end scores the best dev "
                         "checkpoint on the test split and writes report.md and results.json in finetune.run_dir. "
                         "Ctrl-C saves and exits; --resume auto continues exactly.")
    p.add_argument("checkpoint", nargs="?", help="the pretrained checkpoint or run directory (sets "
                   "finetune.init_from); not for --tagger hmm|crf")
    p.add_argument("--task", choices=["classify", "tag"], help="what to train for (sets finetune.task; default "
                   "classify)")
    p.add_argument("--tagger", choices=["neural", "hmm", "crf"], help="the tagger (sets finetune.tagger and implies "
                   "--task tag)")
    p.add_argument("--scheme", choices=["bmes", "bmes-pos"], help="character tags: segmentation only, or joint "
                   "with POS (sets finetune.tag_scheme)")
    p.add_argument("--scratch", action="store_true", help="the checkpoint's shape and tokenizer with random weights "
                   "(sets finetune.from_scratch): the baseline that measures pretraining")
    p.add_argument("--resume", metavar="auto|PATH", help="continue this run from its latest good checkpoint (auto) "
                   "or from a checkpoint path")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="workers on this machine, DDP (default 1)")
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("classify", help="label texts with a fine-tuned classifier (JSON lines out)",
                         description="Print one JSON line per text: the text, its label and every label's "
                         "probability. With --data and --label-field, also compare with the gold labels and print "
                         "accuracy, macro-F1 and the confusion matrix on stderr.")
    p.add_argument("checkpoint", help="a checkpoint of hanlm finetune (step directory, checkpoints or run directory)")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to classify (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="classify the texts of this file, directory, glob, URL or built-in corpus (repeatable)")
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
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to segment (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="segment every line of this file, directory, glob, URL or built-in corpus (repeatable)")
    p.add_argument("--format", choices=["words", "slash", "conll"], help="output format (default: slash for a POS "
                   "tagger, else words)")
    p.add_argument("--gold", action="store_true", help="--data holds gold words: segment their text and score")
    p.add_argument("--gold-format", default="auto", choices=["auto", "words", "slash", "conll"],
                   help="format of the --gold files (default auto)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_segment)

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
                       description="Print the table of config keys that the README shows.")
    s.set_defaults(func=cmd_config_keys)
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
