"""The config tree on disk (``conf/``): where it is, its groups and presets, and the comments that document its keys.

Read as files, without Hydra, so the help page, the "did you mean" of a misspelt preset and a subset's folder name
all see the same presets. Comments are the documentation of a key: the comment lines right above it or the comment
at the end of its line; a block comment also covers the keys after it at the same level that it names (``min_size``
and ``max_size``), up to a blank line.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .config import conf_dir

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w\-]*)\s*:(?:\s+(?P<rest>.*))?$")
_DEFAULT = re.compile(r"^ *- +(?:(?:optional|override) +)?(?P<group>[\w/\-]+)\s*:\s*(?P<choice>[\w\-.]+)?")
_PLAIN_DEFAULT = re.compile(r"^ *- +(?P<name>[\w\-]+)\s*$")


def is_group(group: str) -> bool:
    """A folder of presets under conf/ (``subset``, ``task``, ``hydra/launcher``, ...)."""
    return bool(group) and (conf_dir() / group).is_dir()


def presets(group: str, extra_roots: Sequence[Path] = ()) -> list[str]:
    """The preset names of a config group, sorted (``conf/<group>/*.yaml``, and ``<root>/<group>/*.yaml`` of the
    folders a ``hydra.searchpath`` adds: ``search_roots``)."""
    return sorted({p.stem for root in (conf_dir(), *extra_roots) for p in (root / group).glob("*.yaml")})


def search_roots(overrides: Sequence[str]) -> list[Path]:
    """The config folders ``hydra.searchpath=[pkg://mypkg.conf, file:///path/conf]`` adds (a user's own presets)."""
    import importlib.util

    roots = []
    for text in overrides:
        if not text.startswith("hydra.searchpath="):
            continue
        for entry in text.split("=", 1)[1].strip("[]").split(","):
            scheme, _, where = entry.strip().strip("'\"").partition("://")
            if scheme == "file":
                roots.append(Path(where))
            elif scheme == "pkg":
                try:
                    spec = importlib.util.find_spec(where)
                except (ImportError, ValueError):
                    spec = None
                roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


@dataclass
class Documented:
    """What one YAML file says about itself: its header comment, its defaults, and a comment per dotted key."""

    header: str = ""  # its lines joined by newlines
    defaults: list[tuple[str | None, str]] = field(default_factory=list)  # (group or None for a config, name)
    group_comments: dict[str, str] = field(default_factory=dict)  # comments above a defaults entry, by group
    comments: dict[str, str] = field(default_factory=dict)  # dotted key -> comment


def _split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the text after ``key:``; a ``#`` inside quotes or ``${...}`` is not a comment."""
    quote, depth = "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "#" and depth <= 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _is_block_scalar(value: str) -> bool:
    return bool(re.fullmatch(r"[|>][+-]?\d*", value))


def read_documented(path: Path) -> Documented:
    """Parse a config file's comments line by line (YAML itself drops them)."""
    doc = Documented()
    pending: list[str] = []  # comment lines waiting for their key
    sticky: dict[int, str] = {}  # indentation -> block comment that still covers keys at that level
    stack: list[tuple[int, str]] = []  # (indentation, key) of the enclosing mappings
    in_defaults, block_indent, seen_key = False, -1, False
    for raw in path.read_text().splitlines():
        indent = len(raw) - len(raw.lstrip(" "))
        if block_indent >= 0 and (not raw.strip() or indent > block_indent):
            continue  # inside a `|` / `>` block scalar
        block_indent = -1
        line = raw.strip()
        if not line:
            if not seen_key and pending and not doc.header:
                doc.header = "\n".join(pending)
            pending, sticky = [], {}
            continue
        if line.startswith("#"):
            pending.append(re.sub(r"^#+ ?", "", line))
            continue
        if line.startswith("- "):
            if in_defaults:
                _read_default(doc, line, pending)
            pending = []
            continue
        match = _KEY.match(raw)
        if not match:
            pending = []
            continue
        if not seen_key and not doc.header:  # comments right above a file's first key describe the file
            doc.header, pending = "\n".join(pending), []
        seen_key = True
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        value, inline = _split_comment(match["rest"] or "")
        in_defaults = key == "defaults"
        for level in [lvl for lvl in sticky if lvl > indent]:
            del sticky[level]
        if pending:
            sticky[indent] = " ".join(pending)
            comment = sticky[indent]
        elif inline:
            sticky.pop(indent, None)
            comment = inline
        else:  # a block comment that names this key too (e.g. "min_size ..., max_size ...") covers it
            above = sticky.get(indent, "")
            comment = above if re.search(rf"(?<![\w.-]){re.escape(match['key'])}(?![\w-])", above) else ""
        if inline and pending:
            comment = f"{comment} {inline}"
        if comment and not in_defaults:
            doc.comments[key] = comment
        pending = []
        if not value:  # a mapping: its comment describes the section, not the keys after it
            stack.append((indent, match["key"]))
            sticky.pop(indent, None)
        elif _is_block_scalar(value):
            block_indent = indent
    return doc


def _read_default(doc: Documented, line: str, pending: list[str]) -> None:
    if m := _DEFAULT.match(line):
        if m["choice"]:
            doc.defaults.append((m["group"], m["choice"]))
        if pending:
            doc.group_comments[m["group"]] = " ".join(pending)
    elif m := _PLAIN_DEFAULT.match(line):
        doc.defaults.append((None, m["name"]))


def config_file(group: str | None, name: str) -> Path:
    """``conf/<name>.yaml`` (a primary config) or ``conf/<group>/<name>.yaml`` (a preset)."""
    return conf_dir() / (f"{group}/{name}.yaml" if group else f"{name}.yaml")


def chain(group: str | None, name: str) -> list[Path]:
    """The files a config or preset is built from, in merge order: its plain defaults (same group), then itself."""
    path = config_file(group, name)
    if not path.is_file():
        return []
    files: list[Path] = []
    for dep_group, dep in read_documented(path).defaults:
        if dep_group is None and dep != "_self_":
            files += chain(group, dep)
    return files + [path]


def groups_of(config: str) -> dict[str, str]:
    """Group -> default preset of a primary config, over the configs it includes (``run`` includes ``transfer``)."""
    out: dict[str, str] = {}
    for path in chain(None, config):
        for group, choice in read_documented(path).defaults:
            if group is not None and not group.startswith("hydra/"):
                out[group] = choice
    return out


def load_preset(group: str, name: str) -> dict[str, Any] | None:
    """A preset's values with its same-group defaults merged in (e.g. ``subset/250pc`` over ``subset/full``), or
    None when there is no such preset. Only plain defaults are followed: presets in conf/ use no others."""
    files = chain(group, name)
    if not files:
        return None
    merged = OmegaConf.merge(*(OmegaConf.load(p) for p in files))
    out = OmegaConf.to_container(merged, resolve=False)
    out.pop("defaults", None)
    return out


def comments_for(config: str, choices: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted key -> comment, group -> comment) for a primary config composed with ``choices`` (group -> preset).

    Files later in the merge order win, but a key without a comment keeps the one an earlier file gave it.
    """
    keys: dict[str, str] = {}
    groups: dict[str, str] = {}

    def add(path: Path, package: str) -> None:
        doc = read_documented(path)
        groups.update(doc.group_comments)
        for key, text in doc.comments.items():
            keys[f"{package}.{key}" if package else key] = text

    for path in chain(None, config):
        add(path, "")
    for group, choice in choices.items():
        if choice and not group.startswith("hydra/"):
            for path in chain(group, choice):
                add(path, group.replace("/", "."))
    return keys, groups


def header(group: str | None, name: str) -> str:
    """The comment at the top of a config or preset file (its description), lines joined by newlines."""
    path = config_file(group, name)
    return read_documented(path).header if path.is_file() else ""
