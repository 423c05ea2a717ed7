"""Type, range or form of every config key, checked once on the composed config before any work.

One table for all commands (keys are matched by glob on their dotted path, first match wins), so a bad value is
one line naming the key, the value and what is allowed, with exit code 2, instead of a traceback minutes into a
run or, worse, a stage that finishes with nonsense. Every key has a rule (a test fails for a shipped key without
one): numbers and switches, and also names (which become folder names: ``inputs.plain_name``'s rule), paths,
choices and lists (each item checked). Seeds are integers in [0, 2**32 - 1], the range of numpy's seed (the
narrowest of the generators a seed reaches); larger ones are refused rather than reduced, so a stage folder always
records the seed that was used.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import inputs
from .errors import UserError
from .evaluate import METRICS

Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(low: int, high: int | None = None) -> tuple[Check, str]:
    top = f" and <= {high}" if high is not None else ""
    return (lambda v: _is_int(v) and v >= low and (high is None or v <= high)), f"an integer >= {low}{top}"


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
           ) -> tuple[Check, str]:
    def ok(v: Any) -> bool:
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    return ok, f"a number in {left}{low}, {'inf' if high is None else high}{right}"


def either(word: str, rule: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: v == word or rule[0](v)), f"{word!r} or {rule[1]}"


def choice(*words: str) -> tuple[Check, str]:
    """One of a few words: checked here so a typo fails before the stage folder exists, not inside the run."""
    return (lambda v: v in words), " or ".join(f"'{w}'" for w in words)


def optional(rule: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: v is None or rule[0](v)), f"null or {rule[1]}"


def list_of(rule: tuple[Check, str], increasing: bool = False) -> tuple[Check, str]:
    """A non-empty list whose every item passes ``rule`` (strictly increasing with ``increasing``)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, list) and len(v) > 0 and all(rule[0](x) for x in v)
                and (not increasing or all(a < b for a, b in zip(v, v[1:]))))
    return ok, f"a non-empty list{', increasing,' if increasing else ''} of items each {rule[1]}"


def _plain(v: Any) -> bool:
    try:
        inputs.plain_name(v, "")
    except UserError:
        return False
    return True


SWITCH = ((lambda v: isinstance(v, bool)), "true or false")
AUTO_SWITCH = ((lambda v: isinstance(v, bool) or v == "auto"), "true, false or 'auto'")
FRACTION = number(0, 1)
SEED = integer(0, 2 ** 32 - 1)
TEXT = ((lambda v: isinstance(v, str)), "a string")
NAME = (_plain, "a plain name (no '/', '..' or control characters)")
PATH = ((lambda v: isinstance(v, str) and v != "" and inputs.name_problem(v) is None),
        "a path (without control characters)")
INSIDE = ((lambda v: isinstance(v, str) and inputs.path_problem(v) is None),
          "a path relative to data.root, without '..'")
WNIDS = ((lambda v: isinstance(v, str) and re.fullmatch(r"n\d{8}", v) is not None), "a wnid (n01440764, ...)")
NAMES = ((lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))),
         "null, a name or a list of names")
SETS = ((lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(e, dict) and _plain(e.get("label"))
                                                             for e in v)),
        "a non-empty list of {label: <name>, subset: <preset>, pretrain: ...} entries")

RULES: list[tuple[str, tuple[Check, str]]] = [
    # folders and files
    ("paths.*", PATH),
    ("data.root", optional(PATH)),
    ("data.*_root", optional(PATH)),
    ("data.val_dir", INSIDE),
    ("*train_listing", optional(PATH)),
    ("data.val_labels", optional(PATH)),
    ("data.name", NAME),
    ("data.max_pixels", integer(1)),
    ("*.max_pixels", integer(1)),
    ("subset_dir", optional(PATH)),
    ("pretrain", PATH),  # subset, scratch, torchvision or a pre-training folder
    ("detections", PATH),
    ("output", optional(PATH)),
    ("loader.store", optional(PATH)),
    ("*.root", PATH),
    ("*.cache", PATH),
    ("bench.doc", PATH),
    # choices and names that become folder or file names
    ("split", NAME),
    ("task.*_split", NAME),
    ("task.name", NAME),
    ("train.name", NAME),
    ("metric", choice(*METRICS)),  # ablate evaluate's AP rule
    # a task's own words (metric, protocol, feature layer) are names its plug-in checks (Task.check, Backbone.layer)
    ("task.metric", NAME),
    ("task.protocol", NAME),
    ("task.feature", NAME),
    ("*.augment", choice("crop", "resized_crop")),
    ("train.budget", choice("same_epochs", "same_iterations")),
    ("train.schedule.unit", choice("epoch", "iteration")),
    ("model.name", NAME),  # built-in or a plug-in's (models.build names the known ones when it is neither)
    ("bench.model", NAME),
    ("model.init", NAME),  # the builder's own words (models.skeleton builds it before any work)
    ("loader.name", choice("files", "packed")),
    ("check.what", choice("imagenet", "voc", "both", "voc2012", "sun397")),
    ("what", choice("loader", "model", "train")),
    ("bench.data", choice("generated", "dataset")),
    # lists
    ("*optimizer.steps", list_of(integer(1), increasing=True)),
    ("task.anchor_sizes", list_of(integer(1))),
    ("task.aspect_ratios", list_of(number(0, low_open=True))),
    # experiments
    ("experiment.name", NAME),
    ("experiment.baseline", NAME),
    ("experiment.title", TEXT),
    ("experiment.notes", TEXT),
    ("experiment.x", choice("images", "classes")),
    ("experiment.plot", choice("line", "bar")),
    ("experiment.sets", SETS),
    ("experiment.paper.*.*.value", number(0)),  # a value derived from the paper's text, and how
    ("experiment.paper.*.*.derived", TEXT),
    ("experiment.paper.*.*", number(0)),
    ("experiment.*tasks", list_of(NAME)),
    ("experiment.*_seeds", integer(1)),
    ("tasks", list_of(NAME)),
    ("experiment.*_overrides", list_of(TEXT)),
    # an experiment's settings on the demo (experiment.<data name>: {key: value}), each checked where it lands: in
    # the config of every stage it reaches
    ("experiment.demo.*", ((lambda v: v is None or isinstance(v, (bool, int, float, str, list))),
                           "a value of a key=value setting")),
    # subsets (their meaning is checked by subsets.read_spec and wordnet)
    ("subset.name", NAME),
    ("subset.classes", ((lambda v: v is None or (_is_int(v) and v >= 1) or list_of(WNIDS)[0](v)),
                        "null (all), a number K >= 1 or a list of wnids")),
    ("subset.budget", ((lambda v: v is None), "null or {classes: K, images_per_class: N}")),
    ("subset.budget.classes", integer(1)),
    ("subset.budget.images_per_class", integer(1)),
    ("subset.grouping", optional(NAME)),
    ("subset.exclude", NAMES),
    ("subset.exclude.*", NAMES),
    ("subset.half", optional(choice("min-a", "min-b", "random-a", "random-b"))),
    # data
    ("data.demo.train_per_class", integer(1)),
    ("data.demo.val_per_class", integer(1)),
    ("data.demo.image_size", integer(16, 1024)),
    ("data.demo.voc_image_size", integer(32, 2048)),
    ("data.demo.voc_*", integer(2)),
    ("data.demo.voc2012.*_images", integer(1)),
    ("data.demo.voc2012.image_size", integer(32, 2048)),
    ("data.demo.sun397.*_per_class", integer(1)),
    ("data.demo.sun397.image_size", integer(16, 1024)),
    # subsets
    ("subset.images_per_class", optional(integer(1))),
    ("subset.num_classes", optional(integer(1, 1000))),
    ("subset.strict", SWITCH),
    ("show.groups", optional(integer(1))),
    ("show.members", optional(integer(1))),
    # models
    ("model.input_size", integer(16)),
    ("model.resize", integer(16)),
    ("model.dropout", number(0, 1, high_open=True)),
    ("model.batchnorm", SWITCH),
    ("model.zero_init_residual", SWITCH),
    ("model.squash", SWITCH),
    ("*version", integer(1)),  # model.version, train.version
    # recipes (pre-training and transfer alike)
    ("*batch_size", integer(1)),
    ("*.lr", number(0, low_open=True)),
    ("*lr_mult", number(0)),
    ("*.momentum", number(0, 1, high_open=True)),
    ("*weight_decay", number(0)),
    ("*.gamma", number(0, 1, low_open=True)),
    ("*.length", number(0, low_open=True)),
    ("*.step_every", number(0, low_open=True)),
    ("*.reference_images", integer(1)),
    ("*.epochs", integer(1)),
    ("*.iterations", integer(1)),
    ("*_every", integer(1)),
    ("train.max_evaluations", optional(integer(1))),
    ("train.devices", integer(1)),
    ("train.deterministic", SWITCH),
    ("train.amp", AUTO_SWITCH),
    ("train.compile", AUTO_SWITCH),
    ("train.channels_last", SWITCH),
    ("train.tensorboard", SWITCH),
    # loaders
    ("*.num_workers", either("auto", integer(0))),
    ("check.workers", either("auto", integer(1))),
    ("*.workers", either("auto", integer(0))),  # pack: 0 = every CPU this job may use
    ("loader.pin_memory", AUTO_SWITCH),
    ("loader.persistent_workers", SWITCH),
    ("*.prefetch_factor", integer(1)),
    ("*max_bad_fraction", FRACTION),
    ("*.short_side", integer(16)),
    ("*.quality", integer(1, 100)),
    # transfer
    ("task.*train_resize", number(1)),
    ("task.*test_crops", ((lambda v: v in (2, 10)), "2 or 10")),
    ("task.min_size", integer(16)),
    ("task.max_size", integer(16)),
    ("task.finetune.min_size", integer(16)),
    ("task.finetune.max_size", integer(16)),
    ("task.context", number(1)),
    ("task.*_thresh", FRACTION),
    ("task.*fraction", FRACTION),
    ("task.bg_iou_lo", FRACTION),
    ("task.rpn_*_top_n_*", integer(1)),
    ("task.*_per_image", integer(1)),
    ("task.images_per_batch", integer(1)),
    ("task.finetune.images_per_batch", integer(1)),
    ("task.detections_per_img", integer(1)),
    ("task.freeze_convs", integer(0, 5)),
    ("task.finetune.freeze_convs", integer(0, 5)),
    ("task.image_size", optional(integer(16))),
    ("task.drop_last_pool", SWITCH),
    ("coco", SWITCH),
    # packing, checking, benchmarking
    ("*.chunk_size", integer(1)),
    ("*progress", AUTO_SWITCH),
    ("demo_sized", SWITCH),
    ("check.max_show", integer(1)),
    ("check.min_side", integer(1)),
    ("bench.width", integer(16)),
    ("bench.height", integer(16)),
    ("bench.size", integer(16)),
    ("bench.images", integer(1)),
    ("bench.repeats", integer(1)),
    ("bench.steps", integer(1)),
    ("bench.threads", integer(0)),
    ("bench.gpu_decode", ((lambda v: v in ("auto", "force", "off")), "'auto', 'force' or 'off'")),
    ("bench.litdata", SWITCH),
    ("bench.compile", SWITCH),
    ("bench.record", SWITCH),
    ("probe.mirror", SWITCH),
    ("probe.name", NAME),
    ("probe.steps", list_of(integer(1), increasing=True)),  # epochs
    ("*bias_decay", SWITCH),
    ("device", ((lambda v: isinstance(v, str) and (v in ("auto", "cpu") or v.startswith("cuda"))),
                "'auto', 'cpu', 'cuda' or 'cuda:<index>'")),
    # whole runs
    ("seed", SEED),
    ("*.seed", SEED),
    ("task.split_seed", SEED),
    ("task.partition", integer(1, 10)),
    ("pretrain_seed", SEED),
    ("seeds", ((lambda v: v is None), "null (0.1's key: pretrain_seeds=N transfer_seeds=M replace it)")),
    ("pretrain_seeds", integer(1)),
    ("transfer_seeds", integer(1)),
    ("budget", choice("same_epochs", "same_iterations", "both")),
    ("imagenet_probe", either("auto", SWITCH)),
    ("jobs", either("auto", integer(1))),
    ("plan", SWITCH),
    ("task_overrides", ((lambda v: isinstance(v, list) and all(isinstance(x, str) and x.lstrip("+~").startswith("task.")
                                                              for x in v)),
                        "a list of task.<key>=<value> (filled from the command line's task.* arguments)")),
]


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar and every list of a plain resolved config (a list is one value)."""
    if isinstance(node, dict) and (node or not prefix):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def rule_for(key: str) -> tuple[Check, str] | None:
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(key, pattern)), None)


def check(cfg: DictConfig) -> None:
    """Raise ``UserError`` for the first key whose value breaks its rule; also model/resolution compatibility, and
    what the chosen model and task plug-ins say of their own settings (``models.skeleton``, ``Task.check``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # "???" stays for its command
    for key, value in leaves(resolved):
        if key.startswith("hydra.") or value == "???":
            continue
        rule = rule_for(key)
        if rule is not None and not rule[0](value):
            raise UserError(f"{key}={inputs.shown(repr(value))}: expected {rule[1]}")
    model = resolved.get("model") or {}
    if _is_int(model.get("resize")) and _is_int(model.get("input_size")) and model["resize"] < model["input_size"]:
        raise UserError(f"model.resize={model['resize']} is smaller than model.input_size={model['input_size']}: "
                        "images are resized to model.resize, then cropped to model.input_size")
    if model:
        from .models import skeleton

        skeleton(cfg.model)  # the builder checks its own settings (name, init, ...) without allocating anything
    if isinstance(resolved.get("task"), dict):
        from .tasks import task_for

        task_for(cfg.task)  # a plug-in checks its own settings (Task.check) before any folder is written
