"""What each `hanlm` verb runs: parsed arguments in, the entry function of its layer called, an exit code out.

The parser that fills the arguments is `hanlm.cli`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Sequence

from hanlm.bench import SUITES
from hanlm.config import Config, keys_markdown, load_config, set_key
from hanlm.errors import ConfigError, HanlmError


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

    result = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device, stride=args.stride,
                                 distinct=args.distinct)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hanlm.loading import load_for_inference
    from hanlm.generate import Generation, compile_wanted, generate, require_generating
    from hanlm.sampling import SamplingParams
    from hanlm.speculative import speculation_from_config

    model, cfg, tokenizer = load_for_inference(args.checkpoint, args.device or "cpu")
    try:
        require_generating(model)
    except ValueError as e:
        raise HanlmError(str(e)) from None
    # The flags are the generate.* keys: one rule (hanlm.limits' bounds, as the server's request fields have).
    _apply_flags(cfg, {"generate.max_tokens": ("--max-tokens", args.max_tokens),
                       "generate.temperature": ("--temperature", args.temperature),
                       "generate.top_k": ("--top-k", args.top_k), "generate.top_p": ("--top-p", args.top_p),
                       "generate.seed": ("--seed", args.seed), "generate.compile": ("--compile", args.compile)})
    params = SamplingParams.from_config(cfg.generate, stop=args.stop)
    speculation = speculation_from_config(cfg.generate, tokenizer, args.speculative, args.draft_model,
                                          args.draft_tokens)
    result = Generation()
    print(args.prompt, end="", flush=True)
    try:
        for piece in generate(model, tokenizer, args.prompt, params, result=result, speculation=speculation,
                              compile=compile_wanted(cfg.generate.compile, model)):
            print(piece, end="", flush=True)
    except ValueError as e:
        raise HanlmError(str(e)) from None
    print()
    if result.compile_seconds:
        print(f"[compiled the decoding step in {result.compile_seconds:.1f} s (generate.compile; Inductor keeps it in "
              "its on-disk cache for the next run)]", file=sys.stderr)
    if args.verbose:
        drafted = ""
        if speculation is not None:
            s = speculation.stats
            drafted = (f", {s.accepted} of {s.proposed} drafted tokens kept ({s.acceptance_rate:.0%}) in {s.steps} "
                       f"forwards, {s.draft_s * 1000:.0f} ms drafting")
        print(f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}{drafted}]", file=sys.stderr)
    return 0


def _apply_flags(cfg: Config, flags: dict[str, tuple[str, object]]) -> None:
    """Set each config key from its flag (`{key: (flag, value)}`, None: not given) under the key's own rule:
    a refused value is named by its flag."""
    for key, (flag, value) in flags.items():
        if value is not None:
            set_key(cfg, key, value, flag)


def _api_key(flag: str | None) -> str | None:
    """The key from --api-key, else $HANLM_API_KEY; None only when neither is given. An empty one (a flag
    given an unset variable, `HANLM_API_KEY=`) is an error: it would otherwise serve everyone."""
    env = os.environ.get("HANLM_API_KEY")
    if flag is not None and not flag.strip():
        raise ConfigError("--api-key is empty (was the variable it names unset?): give a key, or leave --api-key "
                          "out to serve without one on loopback only")
    if flag is None and env is not None and not env.strip():
        raise ConfigError("HANLM_API_KEY is set but empty: give it a key, or unset it to serve without one on "
                          "loopback only")
    return (flag or env or "").strip() or None


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from hanlm.serve.app import serve

    cfg = _load(args)
    _apply_flags(cfg, {"serve.port": ("--port", args.port), "serve.max_batch": ("--max-batch", args.max_batch),
                       "serve.max_queue": ("--max-queue", args.max_queue), "serve.engine": ("--engine", args.engine),
                       "generate.compile": ("--compile", args.compile)})
    s = cfg.serve
    api_key = _api_key(args.api_key)
    host = args.host or s.host
    if api_key is None and not _is_loopback(host):
        if args.host:
            print(f"hanlm: warning: serving on {host} without an API key: anyone who can reach it can use it",
                  file=sys.stderr)
        else:  # an address from a config file does not open the server to the network by itself
            print(f"hanlm: note: no API key, so serving on 127.0.0.1 rather than serve.host {host}; give --host "
                  f"{host} to serve there without a key, or set HANLM_API_KEY", file=sys.stderr)
            host = "127.0.0.1"
    serve(args.checkpoint, host=host, port=s.port, api_key=api_key, model_name=args.model_name,
          max_batch=s.max_batch, max_queue=s.max_queue,
          max_body_bytes=s.max_body_bytes, max_json_depth=s.max_json_depth, body_timeout_s=s.body_timeout_s,
          metrics_public=s.metrics_public, device=args.device or "cpu",
          draft=(cfg.generate, args.speculative, args.draft_model, args.draft_tokens),
          max_task_queue=s.max_task_queue, task_threads=s.task_threads, task_batch_texts=s.task_batch_texts,
          header_timeout_s=s.header_timeout_s, compile=cfg.generate.compile, prefill_chunk=s.prefill_chunk,
          prefix_cache_tokens=s.prefix_cache_tokens, engine=s.engine, gguf_dtype=s.gguf_dtype)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from hanlm.mix import build_mixture, summary

    if args.tune_tokens < 1000:
        raise ConfigError(f"--tune-tokens must be at least 1000, got {args.tune_tokens}")
    report = build_mixture(args.neural, args.ngram, args.out, order=args.order, buckets=not args.no_buckets,
                           tune_tokens=args.tune_tokens, evaluate_val=not args.no_eval, device=args.device or "cpu",
                           off_domain=None if args.off_domain.strip().lower() == "none" else args.off_domain,
                           off_domain_texts=args.off_domain_texts)
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
    if cfg.finetune.task == "ner" and not cfg.finetune.init_from and not args.tagger:
        # without a network to start from, the entity tagger is the CRF
        overrides.insert(0, "finetune.tagger=crf")
        cfg = load_config(args.config, overrides)
    if cfg.finetune.task in ("tag", "ner") and cfg.finetune.tagger != "neural":
        if args.nproc > 1 or args.resume:
            raise ConfigError(f"finetune.tagger {cfg.finetune.tagger} trains in one process, in one pass: drop "
                              "--nproc and --resume")
        from hanlm.finetune.counted import fit_counted
        from hanlm.finetune.run import print_result

        print_result(fit_counted(cfg))
        return 0
    if args.nproc <= 1:
        from hanlm.finetune.run import Finetuner, print_result

        print_result(Finetuner(cfg, resume=args.resume).run())
        return 0
    from hanlm.train.distributed import launch

    return launch(_worker_args(args.config, overrides, args.resume), nproc=args.nproc, nnodes=1, node_rank=0,
                  rdzv_endpoint=None, max_restarts=0, module="hanlm.finetune")


def _texts_or_data(args: argparse.Namespace) -> None:
    """`hanlm classify`, `segment` and `ner` read texts from --text or from --data, exactly one of them."""
    if bool(args.text) == bool(args.data):
        raise ConfigError("give the texts with --text (repeatable) or the file(s) with --data, one of the two")


def cmd_classify(args: argparse.Namespace) -> int:
    from hanlm.loading import load_classifier
    from hanlm.tasks.predict import classify_file

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

    print(f"wrote {export(args.checkpoint, args.format, args.out, args.dtype, force=args.force)}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from hanlm.data.tagged import TaggedSentence, format_sentence
    from hanlm.loading import load_tagger
    from hanlm.tasks.taggers import segment_file

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


def cmd_ner(args: argparse.Namespace) -> int:
    from hanlm.data.ner import read_ner
    from hanlm.data.tagged import text_lines
    from hanlm.loading import load_entity_tagger
    from hanlm.tasks.metrics import EntityScores

    _texts_or_data(args)
    if args.gold and not args.data:
        raise ConfigError("--gold scores --data files that hold gold entities; it does not apply to --text")
    tagger, cfg, path = load_entity_tagger(args.checkpoint, args.device or "cpu")
    print(f"{path}: {tagger.kind} entity tagger, scheme {tagger.scheme}, types "
          f"{', '.join(sorted({t[2:] for t in cfg.finetune.labels if t != 'O'}))}", file=sys.stderr)
    if args.text:
        texts, gold = list(args.text), None
    elif args.gold:
        sentences = list(read_ner(args.data, cfg.data, args.format))
        texts, gold = [s.text for s in sentences], [s.entities for s in sentences]
    else:
        texts, gold = [line for _, _, line in text_lines(args.data, cfg.data) if line.strip()], None
    scores = EntityScores()
    for i in range(0, len(texts), 256):
        chunk = texts[i:i + 256]
        for k, (text, found) in enumerate(zip(chunk, tagger.entities(chunk))):
            entities = [{"text": text[e.start:e.end], "type": e.type, "start": e.start, "end": e.end} for e in found]
            print(json.dumps({"text": text, "entities": entities}, ensure_ascii=False))
            if gold is not None:
                scores.add(gold[i + k], found)
    if gold is not None:
        print(scores.summary(), file=sys.stderr)
    return 0
