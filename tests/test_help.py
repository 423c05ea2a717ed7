"""Per-command help pages, the YAML comments they show, and the override checks behind "did you mean"."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from imnet_ablate import conftree, help, overrides
from imnet_ablate.cli import COMMANDS, command_args, split_command
from imnet_ablate.errors import UserError


@pytest.fixture(scope="module")
def hydra_session():
    """One Hydra initialisation for many compositions (``overrides.compose`` reuses it), as in ``ablate run``."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conftree.conf_dir()), version_base=None):
        yield


def test_every_command_has_examples_with_real_presets_and_keys(hydra_session):
    for name, cmd in COMMANDS.items():
        assert cmd.examples, name
        for example in cmd.examples:
            words = shlex.split(example)
            assert words[0] == "ablate" and split_command(words[1:])[0] == name, example
            # presets and keys, as for a sweep (composing each example in full would cost 31 compositions)
            overrides.check(name, cmd.config, ["-m", *command_args(name, split_command(words[1:])[1])])


def test_every_command_has_a_help_page(hydra_session):
    for name, cmd in COMMANDS.items():
        page = help.render(name, cmd.help, cmd.config, cmd.examples, [])
        assert page.startswith(f"ablate {name}: {cmd.help}") and "\nkeys (key=value" in page
        assert "hydra" not in page.split("\nkeys (")[1].split("\n-m sweeps")[0]  # Hydra's own node is not listed


def test_comments_above_inline_and_naming_several_keys(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "# What this file is.\n"
        "# Second line.\n"
        "defaults:\n"
        "  # Which task: voc-det or voc-cls.\n"
        "  - task: voc-det\n"
        "  - _self_\n"
        "# Sizes: min_size is the shorter side, max_size the longer.\n"
        "min_size: 600\n"
        "max_size: 1000\n"
        "other: 1\n"
        "ratio: 0.5   # kept # as text: 'a # b'\n"
        "notes: |\n"
        "  min_size: not a key, a line of text\n"
        "opt:\n"
        "  lr: 0.1          # learning rate\n"
        "  steps: [1, 2]\n"
        "cache: ${oc.env:HOME}/x   # where\n")
    doc = conftree.read_documented(path)
    assert doc.header == "What this file is.\nSecond line."
    assert doc.defaults == [("task", "voc-det"), (None, "_self_")]
    assert doc.group_comments == {"task": "Which task: voc-det or voc-cls."}
    assert doc.comments == {"min_size": "Sizes: min_size is the shorter side, max_size the longer.",
                            "max_size": "Sizes: min_size is the shorter side, max_size the longer.",
                            "ratio": "kept # as text: 'a # b'", "opt.lr": "learning rate", "cache": "where"}


def test_a_preset_is_read_over_its_defaults():
    assert conftree.load_preset("subset", "250pc")["images_per_class"] == 250
    assert conftree.load_preset("subset", "250pc")["strict"] is False  # from subset/full.yaml
    assert conftree.load_preset("subset", "no-such-preset") is None
    assert conftree.chain("task", "voc-det-demo")[-2:] == [conftree.config_file("task", "voc-det"),
                                                          conftree.config_file("task", "voc-det-demo")]


def test_one_line_keeps_a_short_comment_and_cuts_a_long_one_after_its_sentence():
    assert help.one_line("Root of every\n   stage folder.", 80) == "Root of every stage folder."
    assert help.one_line("Real data on disk. Set both roots, e.g. data=imagenet data.root=...", 30) == \
        "Real data on disk."
    assert help.one_line("word " * 40, 30).endswith("...") and len(help.one_line("word " * 40, 30)) <= 30


def test_did_you_mean_offers_only_names_about_as_close_as_the_best():
    assert overrides.did_you_mean("alexnet_smal", ["alexnet", "alexnet_caffe", "alexnet_small"]) == \
        "; did you mean alexnet_small?"
    assert overrides.did_you_mean("25opc", ["25pc", "250pc", "full"]) == "; did you mean 25pc or 250pc?"
    assert overrides.did_you_mean("zzz", ["25pc", "full"]) == ""


def test_hydra_flags_and_their_values_are_not_overrides():
    args = overrides.split_args(["subset=250pc", "--package", "subset", "-m", "train.lr=0.1,0.2"])
    assert args.overrides == ["subset=250pc", "train.lr=0.1,0.2"] and args.multirun and not args.hydra_only
    assert overrides.split_args(["--cfg", "job", "seed=1"]).overrides == ["seed=1"]
    assert overrides.split_args(["--hydra-help"]).hydra_only
    with pytest.raises(UserError, match="-m with --cfg"):  # Hydra's own message is a traceback
        overrides.split_args(["-m", "seed=0,1", "--cfg", "job"])


@pytest.mark.parametrize("command, args, words", [
    ("subset", ["task=voc-det"], "task: `ablate subset` has no task presets; its groups are"),
    ("subset", ["subset.images_per_klass=5"], "did you mean subset.images_per_class?"),
    ("pretrain", ["modle=alexnet"], "modle: no such key in `ablate pretrain`; did you mean model?"),
    ("pretrain", ["hydra/launcher=submitit_slurm", "hydra.launcher.partitio=gpu"],
     "did you mean hydra.launcher.partition?"),
    ("subset", ["250pc"], "250pc: not an override; expected key=value or group=preset"),
    ("subset", ["subset=xyzzy"], "subset=xyzzy: no such subset preset; `ablate subset --help` lists the 21 presets"),
])
def test_override_mistakes_are_one_line(command, args, words):
    with pytest.raises(UserError, match=words.replace("?", r"\?").replace("`", ".")) as e:
        overrides.check(command, COMMANDS[command].config, args)
    assert "\n" not in str(e.value) and "search path" not in str(e.value)


def test_valid_overrides_and_hydra_keys_pass():
    overrides.check("pretrain", "pretrain", ["subset=250pc", "train.batch_size=8", "+extra=1",
                                             "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])
    overrides.check("pretrain", "pretrain", ["-m", "subset=500pc,250pc", "seed=0,1"])
