"""Config validation: every numeric or switch key of every command has a rule, and bad values exit 2 early."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import run_ablate
from imnet_ablate.cli import COMMANDS
from imnet_ablate.errors import UserError
from imnet_ablate.experiments import compose
from imnet_ablate.validate import check, leaves, rule_for

VARIANTS = [[], ["task=voc-det"], ["task=voc-det-demo"], ["task=voc-cls-demo"], ["loader=packed"], ["train=caffe"],
            ["model=alexnet_caffe"], ["model=alexnet"]]


def composed_configs():
    for name, command in COMMANDS.items():
        for overrides in VARIANTS:
            try:
                yield name, overrides, compose(command.config, overrides)
            except UserError:  # that command has no such group
                continue


def test_every_shipped_config_passes():
    for name, overrides, cfg in composed_configs():
        check(cfg)  # raises on the first bad value


def test_every_numeric_or_switch_key_has_a_rule():
    missing = set()
    for _, _, cfg in composed_configs():
        for key, value in leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)):
            if key.startswith(("hydra.", "experiment.")):
                continue
            if isinstance(value, (bool, int, float)) or value == "auto":
                if rule_for(key) is None:
                    missing.add(key)
    assert not missing, f"add rules to validate.RULES for: {sorted(missing)}"


@pytest.mark.parametrize("command, override, words", [
    ("pretrain", "train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
    ("pretrain", "train.optimizer.lr=-1", "train.optimizer.lr=-1: expected a number in (0, inf)"),
    ("pretrain", "loader.num_workers=-2", "loader.num_workers=-2: expected 'auto' or an integer >= 0"),
    ("pretrain", "train.deterministic=maybe", "train.deterministic='maybe': expected true or false"),
    ("pretrain", "model.resize=20", "model.resize=20 is smaller than model.input_size=28"),
    ("transfer", "task.linear.iterations=-5", "task.linear.iterations=-5: expected an integer >= 1"),
    ("transfer", "task=voc-det task.box_nms_thresh=3", "task.box_nms_thresh=3: expected a number in [0, 1]"),
    ("subset", "subset.images_per_class=0", "subset.images_per_class=0: expected null or an integer >= 1"),
    ("run", "pretrain_seeds=0", "seeds=0: expected an integer >= 1"),
])
def test_bad_values_are_one_line_exit_2_before_any_work(tmp_path, command, override, words):
    proc = run_ablate(command, *override.split(), f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'c'}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert words in lines[-1] and len([ln for ln in lines if "error" in ln]) == 1, proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "c").exists()  # nothing generated or written
