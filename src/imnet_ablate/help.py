"""``ablate <command> --help``: one page per command, built from the config that command composes.

It shows only the groups the command uses, with each preset's description (its file's header comment), every key
with its current value and its one-line comment from the YAML, and the command's examples from ``cli.COMMANDS``.
Overrides given with ``--help`` are applied first, and on the demo data a stage command's page shows what it would
run (``sizing``): ``ablate transfer task=voc-det --help`` shows voc-det-demo's keys and says so.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from . import conftree, overrides, sizing
from .config import compose

WIDTH = 118  # characters per line: longer comments are cut after their first sentence, or at the width
VALUE_WIDTH = 60


def one_line(text: str, width: int) -> str:
    """A comment on one line: whitespace collapsed; if too long, its first sentence, cut at ``width`` if need be."""
    text = " ".join(text.split())
    if len(text) > width and (sentence := re.match(r"(.{10,}?(?<!e\.g)(?<!i\.e)\.)\s", text)):
        text = sentence.group(1)
    if len(text) > width:
        text = text[: max(width - 3, 1)].rsplit(" ", 1)[0] + "..."
    return text


def show_value(value: Any) -> str:
    """A value as a user would type it on the command line (interpolations unresolved)."""
    if value is None:
        return "null"
    if value == "???":
        return "??? (required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        if any(isinstance(v, (dict, list)) for v in value):
            return f"[{len(value)} entries]"
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    text = str(value)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


def leaves(node: Mapping[str, Any], comments: Mapping[str, str], prefix: str = ""
           ) -> Iterator[tuple[str, str | None]]:
    """(dotted key, shown value) of every key to list; a mapping is listed (without value) only when commented."""
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            if path in comments:
                yield path, None
            yield from leaves(value, comments, path)
        else:
            yield path, show_value(value)


def key_lines(cfg: Mapping[str, Any], comments: Mapping[str, str], used: Mapping[str, str]) -> list[str]:
    """The keys section, as ``key=value`` lines (the current values) each followed by its comment: the command's
    own keys first, then one block per group."""
    packages = {g.replace("/", "."): g for g in used}
    blocks: dict[str | None, list[str]] = {None: []}
    for key, value in leaves(cfg, comments):
        section = next((p for p in packages if key == p or key.startswith(p + ".")), None)
        if section not in blocks:
            blocks[section] = ["", f"  [{packages[section]}={used[packages[section]]}]"]
        lines = blocks[section]
        lines.append(f"  {key}" if value is None else f"  {key}={value}")
        if comments.get(key):
            lines.append(f"      {one_line(comments[key], WIDTH - 6)}")
    return ["keys (key=value, with the current values):", *(line for block in blocks.values() for line in block)]


def group_lines(used: Mapping[str, str], group_comments: Mapping[str, str]) -> list[str]:
    """The groups section: each group's presets with their descriptions, the current one marked."""
    lines = ["groups (group=preset; * marks the current one):"]
    for group, choice in used.items():
        names = conftree.presets(group)
        lines.append(f"  {group}=" + (f"  {one_line(group_comments[group], WIDTH - 6 - len(group))}"
                                      if group in group_comments else ""))
        width = max(len(n) for n in names)
        for name in names:
            mark = "*" if name == choice else " "
            about = one_line(conftree.header(group, name), WIDTH - 8 - width)
            lines.append(f"   {mark} {name:<{width}}  {about}".rstrip())
    return lines


def render(name: str, summary: str, config: str, examples: Sequence[str], args: list[str], sized: bool = False
           ) -> str:
    """The help page of ``ablate <name>`` (``args``: the overrides typed with ``--help``; ``sized``: the command
    runs demo-sized recipes on the demo data)."""
    given = overrides.split_args(args).overrides
    composed, resized = sizing.compose(config, given, hydra=True) if sized else \
        (compose(config, given, hydra=True), sizing.Sizing())
    order = list(composed.keys())
    used = dict(sorted(overrides.choices(composed).items(),
                       key=lambda gc: order.index(gc[0]) if gc[0] in order else len(order)))
    comments, group_comments = conftree.comments_for(config, used)
    plain = OmegaConf.to_container(composed, resolve=False, throw_on_missing=False)
    plain.pop("hydra", None)
    about = conftree.header(None, config)
    lines = [f"ablate {name}: {summary}", "",
             f"usage: ablate {name} [group=preset ...] [key=value ...] [-m] [--cfg job] [--hydra-help]"]
    if about:
        lines += ["", *(f"  {line}" for line in about.splitlines())]
    if resized.note:
        lines += ["", f"  {resized.note}"]
    if examples:
        lines += ["", "examples:", *(f"  {e}" for e in examples)]
    if used:
        lines += ["", *group_lines(used, group_comments)]
    lines += ["", *key_lines(plain, comments, used), "",
              "-m sweeps comma-separated values (one run each); --cfg job prints the composed config; --hydra-help "
              "shows Hydra's own flags."]
    return "\n".join(lines)


def render_family(prefix: str, commands: Mapping[str, str]) -> str:
    """The page of a command family such as ``ablate data``: its sub-commands (``commands``: name -> summary)."""
    width = max(len(n) for n in commands)
    lines = [f"usage: ablate {prefix} <command> [key=value ...]", "", "commands:"]
    lines += [f"  {n:<{width}}  {s}" for n, s in commands.items()]
    lines += ["", f"`ablate {prefix} <command> --help` shows the command's groups, keys and examples."]
    return "\n".join(lines)
