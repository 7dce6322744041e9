"""The `hanlm` command: one entry point whose verbs follow the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hanlm import __version__
from hanlm.config import Config, keys_markdown, load_config
from hanlm.errors import HanlmError


def _config_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config file, or a built-in one by name: tiny, default, base (default: built-in "
                        "defaults, the same as `default`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.lr=3e-4 (repeatable; `hanlm config keys` lists keys)")
    return p


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hanlm.data.prepare import prepare

    cfg = _load(args)
    result = prepare(cfg, args.out, force=args.force, progress=not args.no_progress and cfg.log.progress)
    if args.json:
        print(json.dumps({"directory": str(result.directory), "reused": result.reused, **result.meta},
                         ensure_ascii=False, indent=2))
    else:
        print(result.summary())
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
                                     "train, evaluate and serve, driven by one config.")
    parser.add_argument("--version", action="version", version=f"hanlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    common = _config_options()

    p = verbs.add_parser("prepare", parents=[common], help="read sources, train or load the tokenizer, write "
                         "token shards", description="Read the data sources (data.*), train the tokenizer "
                         "(tokenizer.*) or load tokenizer.path, and write train/val token shards with meta.json. "
                         "Reuses existing shards when sources and settings are unchanged.")
    p.add_argument("--out", metavar="DIR", help="output directory (default: data.prepared_dir, else "
                   "$HANLM_HOME/prepared/<sources>-<tokenizer>)")
    p.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print meta.json and the directory as JSON")
    p.set_defaults(func=cmd_prepare)

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
