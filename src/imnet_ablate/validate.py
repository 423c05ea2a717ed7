"""Types and ranges of every numeric and switch key, checked once on the composed config before any work.

One table for all commands (keys are matched by glob on their dotted path, first match wins), so a bad value is
one line naming the key, the value and what is allowed, with exit code 2, instead of a traceback minutes into a
run or, worse, a stage that finishes with nonsense.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

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


def optional(rule: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: v is None or rule[0](v)), f"null or {rule[1]}"


SWITCH = ((lambda v: isinstance(v, bool)), "true or false")
AUTO_SWITCH = ((lambda v: isinstance(v, bool) or v == "auto"), "true, false or 'auto'")
FRACTION = number(0, 1)

RULES: list[tuple[str, tuple[Check, str]]] = [
    # data
    ("data.demo.train_per_class", integer(1)),
    ("data.demo.val_per_class", integer(1)),
    ("data.demo.image_size", integer(16, 1024)),
    ("data.demo.voc_image_size", integer(32, 2048)),
    ("data.demo.voc_*", integer(2)),
    # subsets
    ("subset.images_per_class", optional(integer(1))),
    ("subset.num_classes", optional(integer(1, 1000))),
    ("subset.strict", SWITCH),
    # models
    ("model.input_size", integer(16)),
    ("model.resize", integer(16)),
    ("model.dropout", number(0, 1, high_open=True)),
    ("model.batchnorm", SWITCH),
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
    ("train.devices", integer(1)),
    ("train.deterministic", SWITCH),
    ("train.amp", AUTO_SWITCH),
    ("train.compile", AUTO_SWITCH),
    ("train.channels_last", SWITCH),
    ("train.tensorboard", SWITCH),
    ("train.progress", AUTO_SWITCH),
    # loaders
    ("*.num_workers", either("auto", integer(0))),
    ("check.workers", either("auto", integer(1))),
    ("*.workers", either("auto", integer(0))),  # pack: 0 = every core
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
    ("task.*_thresh", FRACTION),
    ("task.*fraction", FRACTION),
    ("task.bg_iou_lo", FRACTION),
    ("task.rpn_*_top_n_*", integer(1)),
    ("task.*_per_image", integer(1)),
    ("task.images_per_batch", integer(1)),
    ("task.detections_per_img", integer(1)),
    ("task.freeze_convs", integer(0, 5)),
    ("task.drop_last_pool", SWITCH),
    ("coco", SWITCH),
    # packing, checking, benchmarking
    ("*.chunk_size", integer(1)),
    ("*.progress", AUTO_SWITCH),
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
    ("*bias_decay", SWITCH),
    ("device", ((lambda v: isinstance(v, str) and (v in ("auto", "cpu") or v.startswith("cuda"))),
                "'auto', 'cpu', 'cuda' or 'cuda:<index>'")),
    # whole runs
    ("seed", integer(0)),
    ("*.seed", integer(0)),
    ("pretrain_seed", integer(0)),
    ("pretrain_seeds", integer(1)),
    ("transfer_seeds", integer(1)),
    ("budget", ((lambda v: v in ("same_epochs", "same_iterations", "both")), "same_epochs, same_iterations or both")),
    ("imagenet_probe", either("auto", SWITCH)),
    ("jobs", either("auto", integer(1))),
    ("plan", SWITCH),
]


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar of a plain resolved config; list items are skipped."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif not isinstance(node, list):
        yield prefix, node


def rule_for(key: str) -> tuple[Check, str] | None:
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(key, pattern)), None)


def check(cfg: DictConfig) -> None:
    """Raise ``UserError`` for the first key whose value breaks its rule; also model/resolution compatibility."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # "???" stays for its command
    for key, value in leaves(resolved):
        if key.startswith(("hydra.", "experiment.")) or value == "???":
            continue
        rule = rule_for(key)
        if rule is not None and not rule[0](value):
            raise UserError(f"{key}={value!r}: expected {rule[1]}")
    model = resolved.get("model") or {}
    if _is_int(model.get("resize")) and _is_int(model.get("input_size")) and model["resize"] < model["input_size"]:
        raise UserError(f"model.resize={model['resize']} is smaller than model.input_size={model['input_size']}: "
                        "images are resized to model.resize, then cropped to model.input_size")
