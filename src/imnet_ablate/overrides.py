"""A command line's overrides checked against the config tree before Hydra runs.

A misspelt preset (``subset=250``, ``model=alexnet_smal``) or key (``train.batchsize=8``) is one line naming it with
the closest valid names ("did you mean ..."), instead of Hydra's message with its search path, or its advice to
append the key with ``+key``, which would only hide the typo here. Sweeps (``-m subset=500pc,250pc``) are checked
value by value, so a typo fails before the first job starts.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from . import conftree
from .config import compose, one_line
from .errors import UserError

FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun"}
MULTIRUN = {"-m", "--multirun"}
# Flags Hydra answers on its own (its help page, --info, shell completion): the command line is passed on unchecked.
HYDRA_ONLY = {"--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--run", "-r"}


class Args(NamedTuple):
    overrides: list[str]
    multirun: bool
    hydra_only: bool


def split_args(args: list[str]) -> Args:
    """The overrides among a command's arguments (everything that is not a Hydra flag or a flag's value)."""
    overrides, multirun, hydra_only = [], False, False
    it = iter(args)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in FLAGS_WITH_VALUE:
            if "=" not in arg:
                next(it, None)
        elif arg in MULTIRUN:
            multirun = True
        elif name in HYDRA_ONLY:
            hydra_only = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    shown = [a for a in args if a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i")]
    if multirun and shown:
        raise UserError(f"-m with {shown[0]}: Hydra shows the config of a single run only; drop -m (and the commas)")
    return Args(overrides, multirun, hydra_only)


def closest(word: str, choices: list[str], cutoff: float = 0.6) -> list[str]:
    """The (at most 3) ``choices`` nearest to ``word`` by difflib's ratio, only those about as near as the best one:
    ``alexnet_smal`` gets alexnet_small, not also alexnet."""
    scored = []
    for choice in dict.fromkeys(choices):
        matcher = difflib.SequenceMatcher(None, word, choice)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            scored.append((matcher.ratio(), choice))
    scored.sort(key=lambda rc: -rc[0])
    return [c for r, c in scored if r >= scored[0][0] - 0.1][:3] if scored else []


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean a or b?"`` (each name after ``prefix``), or "" when no choice is near ``word``."""
    close = closest(word, choices)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def choices(cfg: DictConfig) -> dict[str, str]:
    """Group -> chosen preset of a config composed with ``hydra=True``, without Hydra's own groups."""
    return picked(cfg.hydra.runtime.choices)


def picked(runtime_choices: Any) -> dict[str, str]:
    """Hydra's ``runtime.choices`` (of a composed config, or of a running app) without Hydra's own groups."""
    plain = OmegaConf.to_container(runtime_choices) if OmegaConf.is_config(runtime_choices) else dict(runtime_choices)
    return {g: c for g, c in plain.items() if not g.startswith("hydra/") and c is not None}


def dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a config, mappings included, as the dotted paths a user types."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from dotted_keys(node._get_node(key), path)


def has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether ``dotted`` names a key of ``cfg`` (a ``???`` value counts: the key is there, unset)."""
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, DictConfig) and part in node.keys():
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as e:
            if "=" not in text and not text.startswith("~"):
                raise UserError(f"{text}: not an override; expected key=value or group=preset") from e
            raise UserError(one_line(e)) from e
    return parsed


def _values(override: Any) -> list[str]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fold_task_keys(command: str, args: list[str]) -> list[str]:
    """For a command that runs every task of ``tasks`` (``ablate run``, ``ablate report``): ``task.<key>=<value>``
    arguments become one ``task_overrides=[...]`` (each task's transfers take them; its config has no single task to
    hold them), and ``task=<preset>``, which would silently turn every task into that one, is refused."""
    parsed_args = split_args(args)
    folded = []
    for text, override in zip(parsed_args.overrides, _parse(parsed_args.overrides)):
        key = override.key_or_group
        if key == "task":
            raise UserError(f"{text}: `ablate {command}` runs each task of tasks=[...]; choose them with "
                            f"tasks=[{_values(override)[0]}], and set a task's keys with task.<key>=<value>")
        if key == "task_overrides":
            raise UserError(f"{text}: set by `ablate {command}` from task.<key>=<value> arguments; give those instead")
        if key.startswith("task.") and override.is_sweep_override():
            raise UserError(f"{text}: `ablate {command}` does not sweep a task's keys; run it once per value "
                            "(finished stages are reused)")
        if key.startswith("task."):
            folded.append(text)
    if not folded:
        return args
    return [*(a for a in args if a not in folded), f"task_overrides=[{','.join(_quoted(t) for t in folded)}]"]


def check_group(command: str, override: Any, used: dict[str, str], roots: list[Path]) -> None:
    """A group override names a group this command uses and, for each swept value, one of its presets (in conf/
    or in the ``roots`` a hydra.searchpath adds)."""
    group = override.key_or_group
    if group not in used:
        raise UserError(f"{group}: `ablate {command}` has no {group} presets; its groups are {', '.join(used)}")
    names = conftree.presets(group, roots)
    for value in _values(override):
        if value not in names:
            listed = (f"; expected one of {', '.join(names)}" if len(names) <= 10
                      else f"; `ablate {command} --help` lists the {len(names)} presets")
            hint = did_you_mean(value, names) or listed
            raise UserError(f"{group}={value}: no such {group} preset{hint}")


def check_key(command: str, key: str, cfg: DictConfig, used: dict[str, str]) -> None:
    """A key override names a key of the composed config (a typo is never silently added); ``cfg`` has Hydra's
    node too, for ``hydra.launcher.*`` keys."""
    if has_key(cfg, key):
        return
    hint = key_hint(key, cfg, list(used)) or f"; `ablate {command} --help` lists the keys"
    raise UserError(f"{key}: no such key in `ablate {command}`{hint}")


def key_hint(key: str, cfg: DictConfig, groups: list[str]) -> str:
    """"; did you mean ..." for a key ``cfg`` lacks: its siblings where its parent exists, else every key (and the
    ``groups``), or ""."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent and has_key(cfg, parent) else None
    if isinstance(node, DictConfig):  # compare names with names: a long shared prefix would match anything
        return did_you_mean(last, [str(k) for k in node.keys()], prefix=f"{parent}.")
    hydra_key = key.startswith("hydra.")
    known = [k for k in dotted_keys(cfg) if k.startswith("hydra.") == hydra_key and k != "hydra"] + groups
    return did_you_mean(key, known)


def check(command: str, config: str, args: list[str]) -> None:
    """Raise a one-line ``UserError`` for the first misspelt preset or key of ``args``, and for anything else Hydra
    refuses. The presets are checked from the files alone; the config is composed once (as Hydra will), and only
    when that fails, again without the key overrides, to name the misspelt key."""
    from hydra.core.override_parser.types import OverrideType

    parsed_args = split_args(args)
    if parsed_args.hydra_only:
        return
    parsed = _parse(parsed_args.overrides)
    used = conftree.groups_of(config)
    groups = [o for o in parsed if o.type == OverrideType.CHANGE and o.package is None
              and (conftree.is_group(o.key_or_group) or o.key_or_group.startswith("hydra/"))]
    roots = conftree.search_roots(parsed_args.overrides)
    for override in groups:
        if not override.key_or_group.startswith("hydra/"):  # Hydra's groups also have presets of its own
            check_group(command, override, used, roots)
    keys = [o for o in parsed if o.type == OverrideType.CHANGE and all(o is not g for g in groups)]
    error = None  # a sweep is not composed here (Hydra composes each job); its keys are checked below
    if not parsed_args.multirun:
        try:
            compose(config, parsed_args.overrides)
            return
        except UserError as hydra_says:
            error = hydra_says
    if keys:  # name the misspelt key, on the config of the group choices (the first value of a sweep)
        cfg = compose(config, [f"{o.key_or_group}={_values(o)[0]}" for o in groups], hydra=True)
        for override in keys:
            check_key(command, override.key_or_group, cfg, used)
    if error is not None:
        raise error
