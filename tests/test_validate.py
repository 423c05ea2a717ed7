"""Config validation: every key of every command has a rule, and bad values exit 2 early, naming key and value."""
from __future__ import annotations

import functools

import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_ablate
from imnet_ablate.cli import COMMANDS, conf_dir
from imnet_ablate.config import compose as compose_command
from imnet_ablate.errors import UserError
from imnet_ablate.validate import check, leaves, rule_for

VARIANTS = [[], ["task=voc-det"], ["task=voc-det-demo"], ["task=voc-cls-demo"], ["loader=packed"], ["train=caffe"],
            ["model=alexnet_caffe"], ["model=alexnet"], ["data=imagenet"], ["model=resnet50", "train=resnet"],
            ["model=resnet18", "train=resnet_demo"]]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@functools.cache
def composed_configs() -> list:
    """Every command's config under each variant that applies to it, and `ablate run` with every experiment
    (composed once: about a hundred compositions)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    out = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        for name, command in COMMANDS.items():
            extra = [[f"experiment={e}"] for e in EXPERIMENTS] if name in ("run", "report") else []
            for overrides in VARIANTS + extra:
                try:
                    out.append((name, overrides, compose(config_name=command.config, overrides=overrides)))
                except HydraException:  # that command has no such group
                    continue
    return out


def test_every_shipped_config_passes():
    for name, overrides, cfg in composed_configs():
        check(cfg)  # raises on the first bad value


def test_every_key_has_a_rule():
    """Numbers, switches, names, paths, choices and lists alike: a key without a rule is a value nobody checks."""
    missing = set()
    for _, _, cfg in composed_configs():
        for key, _ in leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)):
            if not key.startswith("hydra.") and rule_for(key) is None:
                missing.add(key)
    assert not missing, f"add rules to validate.RULES for: {sorted(missing)}"


def shipped(command: str = "transfer", *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name=COMMANDS[command].config, overrides=list(overrides))


# (command, override, the key and value the message names); checked in-process: the CLI path is test_faults'
@pytest.mark.parametrize("command, override, shown", [
    ("transfer", "seed=4294967296", "seed=4294967296: expected an integer >= 0 and <= 4294967295"),
    ("transfer", "seed=-1", "seed=-1"),
    ("transfer", "pretrain_seed=99999999999999999999", "pretrain_seed=99999999999999999999"),
    ("subset", "subset.seed=1e3", "subset.seed=1000.0"),
    ("transfer", "task.image_size=-1", "task.image_size=-1: expected null or an integer >= 16"),
    ("transfer", "task.finetune.optimizer.steps=[300,200]", "task.finetune.optimizer.steps=[300, 200]: expected "
     "a non-empty list, increasing, of items each an integer >= 1"),
    ("transfer", "task.finetune.optimizer.steps=[]", "task.finetune.optimizer.steps=[]"),
    ("transfer", "task.finetune.optimizer.steps=[10,-5]", "steps=[10, -5]"),
    ("transfer", "task=voc-det task.anchor_sizes=[0,32]", "task.anchor_sizes=[0, 32]"),
    ("transfer", "task=voc-det task.aspect_ratios=[1,nan]", "task.aspect_ratios=[1, nan]"),
    ("transfer", "task.protocol=probe", "task.protocol='probe': expected 'linear' or 'finetune'"),
    ("transfer", "task.train_split=../..", "task.train_split='../..': expected a plain name"),
    ("evaluate", "split=../../etc/passwd", "split='../../etc/passwd'"),
    ("run", "experiment.name=../../escape", "experiment.name='../../escape'"),
    ("subset", "subset.name=a/b", "subset.name='a/b'"),
    ("subset", "subset.classes=[n01440764,dog]", "subset.classes=['n01440764', 'dog']"),
    ("subset", "subset.half=upper", "subset.half='upper'"),
    ("subset", "data.val_dir=../elsewhere", "data.val_dir='../elsewhere': expected a path relative to data.root"),
    ("subset", "data.max_pixels=0", "data.max_pixels=0"),
    ("pretrain", "loader.max_pixels=-5", "loader.max_pixels=-5"),
    ("pretrain", "model.name=resnet", "model.name=resnet: unknown model"),
    ("pretrain", "train.augment=[crop]", "train.augment=['crop']"),
])
def test_bad_values_name_key_and_value(command, override, shown):
    with pytest.raises(UserError) as err:
        check(shipped(command, *override.split()))
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_control_characters_in_a_value_stay_on_one_line():
    cfg = shipped("subset")
    cfg.subset.name = "x\n\x1b[2Jy" + "z" * 500
    with pytest.raises(UserError) as err:
        check(cfg)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 300


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


@pytest.mark.parametrize("command, override, words", [
    ("pretrain", "train.augment=flip", "train.augment='flip': expected 'crop' or 'resized_crop'"),
    ("pretrain", "train.budget=both", "train.budget='both': expected 'same_epochs' or 'same_iterations'"),
    ("pretrain", "train.schedule.unit=epochs", "train.schedule.unit='epochs': expected 'epoch' or 'iteration'"),
    ("transfer", "task.metric=map", "task.metric='map': expected 'voc07' or 'area'"),
])
def test_choice_keys_are_checked_before_the_run_creates_its_folder(command, override, words):
    """The stages check these inside their folder (augment in each loader worker, metric after training)."""
    with pytest.raises(UserError, match=words):
        check(compose_command(command, [override]))
