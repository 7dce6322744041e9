"""Managing prepared directories (`hanlm prepare --list`, `--clean`).

Every config gets its own default directory under `$HANLM_HOME/prepared` (see
`prepare.default_dir`), so they accumulate; these helpers show what is there, how big it is and
which one the current config uses, and delete the ones asked for. Only directories that are
prepared data (a meta.json) or hanlm's own half-written temporaries are ever touched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hanlm.atomic import remove_stale_temporaries
from hanlm.config import Config
from hanlm.data.prepare import default_dir, prepared_root
from hanlm.data.shards import read_meta
from hanlm.errors import ConfigError, DataError


@dataclass
class PreparedEntry:
    """One directory under the prepared root."""

    path: Path
    bytes: int
    meta: dict | None  # None when it has no readable meta.json (an unfinished or foreign directory)
    problem: str = ""

    @property
    def tokens(self) -> int:
        return sum(s.get("tokens", 0) for s in self.meta["splits"].values()) if self.meta else 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_prepared(root: Path) -> list[PreparedEntry]:
    """The visible directories under `root`, by name (temporaries, whose names start with a dot, left out)."""
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            entries.append(PreparedEntry(path, _size(path), read_meta(path)))
        except DataError as e:
            entries.append(PreparedEntry(path, _size(path), None, str(e)))
    return entries


def listing(entries: list[PreparedEntry], current: Path | None) -> str:
    """A table of `entries`; `*` marks `current`, the directory the config in use maps to."""
    if not entries:
        return "no prepared directories"
    rows = []
    for e in entries:
        mark = "*" if current is not None and e.path.resolve() == current.resolve() else " "
        if e.meta is None:
            rows.append(f"{mark} {e.path.name:<60} {e.bytes / 1e6:>9.1f} MB  not a finished prepared directory")
            continue
        m = e.meta
        rows.append(f"{mark} {e.path.name:<60} {e.bytes / 1e6:>9.1f} MB  {m.get('tokenizer_kind', '?'):<4} "
                    f"vocab {m.get('vocab_size', 0):>7,}  {e.tokens:>14,} tokens  {m.get('created', '')[:10]}")
    total = sum(e.bytes for e in entries)
    return "\n".join(rows + [f"{len(entries)} directories, {total / 1e6:.1f} MB; * = the current config's"])


def clean_prepared(root: Path, names: list[str]) -> list[Path]:
    """Delete prepared directories under `root`: those named, `stale` (unfinished ones and temporaries
    of dead writers) or `all`. A name that is not a prepared directory there is a ConfigError, checked
    before anything is deleted. Returns what went."""
    entries = {e.path.name: e for e in list_prepared(root)}
    chosen: list[Path] = []
    for name in names:
        if name == "all":
            chosen += [e.path for e in entries.values()]
        elif name == "stale":
            chosen += [e.path for e in entries.values() if e.meta is None and _looks_prepared(e.path)]
        elif name in entries and (entries[name].meta is not None or _looks_prepared(entries[name].path)):
            chosen.append(entries[name].path)
        else:
            known = ", ".join(entries) or "none"
            raise ConfigError(f"--clean {name}: no prepared directory of that name under {root} (there are: {known})")
    removed = remove_stale_temporaries(root) if "stale" in names or "all" in names else []
    for path in dict.fromkeys(chosen):
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _looks_prepared(path: Path) -> bool:
    """An unfinished prepared directory holds only what `prepare` writes; anything else is left alone."""
    return all(p.suffix in (".bin", ".json", ".text", ".lengths") for p in path.iterdir())


def manage(cfg: Config, *, clean: list[str], show: bool) -> str:
    """`hanlm prepare --clean … --list`: delete what `clean` names, then (with `show`) list what is left;
    returns the report to print."""
    root = prepared_root()
    lines = [f"removed {path}" for path in clean_prepared(root, clean)] or ["nothing to remove"] if clean else []
    if show:
        lines.append(listing(list_prepared(root), Path(cfg.data.prepared_dir or default_dir(cfg))))
    return "\n".join(lines)
