"""ResNet backbones: torchvision's networks exactly, the Backbone protocol (features per layer, detection parts,
stages, frozen batch norm), torchvision's ImageNet weights from the hub cache, the configs and recipes."""
from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import REPO
from imnet_ablate import models, validate
from imnet_ablate.config import compose
from imnet_ablate.errors import UserError
from imnet_ablate.models import resnet

CONFIGS = {name: OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml") for name in ("resnet18", "resnet50")}
# name -> (feature_dim, res4 width, parameter count of torchvision's 1000-class network)
SIZES = {"resnet18": (512, 256, 11_689_512), "resnet50": (2048, 1024, 25_557_032)}


@pytest.fixture(autouse=True)
def few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request) -> tuple[str, models.Backbone, nn.Module]:
    """(name, our ResNet, torchvision's) with the same ImageNet-sized head and torchvision's weights in ours."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, request.param)(weights=None).eval()
    ours = models.build(CONFIGS[request.param], 1000).eval()
    ours.load_state_dict(models.renamed_keys(theirs.state_dict(), resnet.TORCHVISION_KEYS))
    return request.param, ours, theirs


def test_registry_builds_torchvision_networks_with_the_documented_key_mapping(pair) -> None:
    name, ours, theirs = pair
    assert isinstance(ours, resnet.ResNet) and models.BUILTIN[name] == f"imnet_ablate.models.resnet:{name}"
    assert sum(p.numel() for p in ours.parameters()) == SIZES[name][2]
    mapped = models.renamed_keys(theirs.state_dict(), resnet.TORCHVISION_KEYS)
    assert set(mapped) == set(ours.state_dict())  # every key maps; nothing left over or missing
    assert {k for k in mapped if k.startswith(("stem.", "head."))} == \
        {"stem." + k for k in theirs.state_dict() if k.startswith(("conv1.", "bn1."))} | \
        {"head." + k[3:] for k in theirs.state_dict() if k.startswith("fc.")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_features_per_layer(pair) -> None:
    name, model, theirs = pair
    dim, res4, _ = SIZES[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pool = model.features(x)
        assert pool.shape == (2, dim) == (2, model.feature_dim)
        assert torch.equal(model.features(x, "fc7"), pool) and torch.equal(model.head(pool), model(x))
        trunk = nn.Sequential(*list(theirs.children())[:-3])  # conv1 .. layer3
        res4_features = model.features(x, "res4")
        assert res4_features.shape == (2, res4)
        assert torch.allclose(res4_features, trunk(x).mean((2, 3)), atol=1e-5)
    with pytest.raises(UserError, match="task.feature=conv5: ResNet has no such layer; expected one of pool, res4"):
        model.features(x, "conv5")


def test_detection_parts_are_the_c4_design_sharing_the_backbones_modules(pair) -> None:
    name, model, _ = pair
    dim, res4, _ = SIZES[name]
    parts = model.detection_parts()
    assert (parts.roi_size, parts.box_dim, parts.trunk.out_channels) == (14, dim, res4)
    with torch.no_grad():
        assert parts.trunk(torch.randn(1, 3, 96, 160)).shape == (1, res4, 6, 10)  # stride 16
        rois = torch.randn(2, res4, 14, 14)
        assert model.layer4(rois).shape[-2:] == (7, 7)  # res5 halves the RoI grid
        assert parts.box_head(rois).shape == (2, dim)
    ours = {id(p) for p in model.parameters()}
    assert {id(p) for p in [*parts.trunk.parameters(), *parts.box_head.parameters()]} == ours - {
        id(p) for p in model.head.parameters()}  # shared, not copied: the detector trains the backbone
    with pytest.raises(UserError, match="detection stride 32"):
        model.detection_parts(stride=32)


def test_freeze_counts_the_stem_and_residual_stages() -> None:
    model = models.build(CONFIGS["resnet18"], 10)
    assert [type(s).__name__ for s in model.stages()] == ["Sequential"] * 5
    assert list(model.stages()[0]) == [model.stem.conv1, model.stem.bn1, model.stem.relu, model.stem.maxpool]
    model.freeze(2)  # Detectron's FREEZE_AT=2: stem and res2
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "layer1"}
    with pytest.raises(UserError, match="freeze=6: ResNet has 5 stages"):
        model.freeze(6)


@pytest.mark.parametrize("parts_first", [False, True])
def test_frozen_batchnorm_keeps_its_statistics_in_train_mode(parts_first: bool) -> None:
    """Whether the task takes the detection parts before or after freezing, they see the frozen layers."""
    torch.manual_seed(0)
    model = models.build(CONFIGS["resnet18"], 10)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    parts = model.detection_parts() if parts_first else None
    model.freeze_batchnorm()
    parts = parts or model.detection_parts()
    detector_parts = nn.ModuleList([parts.trunk, parts.box_head])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*model.modules(), *detector_parts.modules()])
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in detector_parts.modules()) == 20  # every BN but none lost
    detector_parts.train()
    x = torch.randn(2, 3, 128, 128)
    out_train = parts.box_head(parts.trunk(x))
    detector_parts.eval()
    assert torch.equal(out_train, parts.box_head(parts.trunk(x)))  # same in train and eval mode
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_torchvision_initialisation_and_zero_init_residual() -> None:
    model = models.build(CONFIGS["resnet50"], 10)
    conv = model.layer3[0].conv2  # 3x3, 256 -> 256: He normal with fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    zero = models.build({**CONFIGS["resnet50"], "zero_init_residual": True}, 10)
    assert all(bool((block.bn3.weight == 0).all()) for stage in zero.stages()[1:] for block in stage)


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """pretrain=torchvision with model=resnet18: torchvision's file from the torch hub cache, its keys mapped."""
    from omegaconf import OmegaConf

    from imnet_ablate import source

    cfg = OmegaConf.create({"model": dict(CONFIGS["resnet18"]), "pretrain": "torchvision"})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    with pytest.raises(UserError, match=f"pretrain=torchvision: {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth "
                                        r"not found; download it .*resnet18\(weights='IMAGENET1K_V1'\)"):
        source.torchvision_network(cfg)
    torch.manual_seed(1)
    theirs = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(theirs.state_dict(), path)
    for name, weights in source.TORCHVISION.items():  # the file names torchvision's downloader uses
        assert torchvision.models.get_model_weights(name).IMAGENET1K_V1.url.endswith("/" + weights.file)
    assert source.source_of(cfg).key == "torchvision-resnet18"
    ours = source.torchvision_network(cfg).eval()
    assert torch.equal(ours.head.weight, theirs.fc.weight) and torch.equal(ours.stem.bn1.running_var,
                                                                            theirs.bn1.running_var)
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(ours(x), theirs.eval()(x), atol=1e-5)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)  # the wrong network under that name
    with pytest.raises(UserError, match="does not fit") as error:
        source.torchvision_network(cfg)
    assert "\n" not in str(error.value)


def test_recipes_compose_as_documented() -> None:
    cfg = compose("pretrain", ["model=resnet50", "train=resnet"])
    t = cfg.train
    assert (t.batch_size, t.optimizer.lr, t.optimizer.momentum, t.optimizer.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert (t.optimizer.bias_lr_mult, t.optimizer.bias_decay, t.augment) == (1.0, True, "resized_crop")
    assert (t.schedule.unit, t.schedule.length, t.schedule.step_every, t.schedule.gamma) == ("epoch", 90, 30, 0.1)
    assert (t.budget, t.reference_images, cfg.model.input_size, cfg.model.resize) == ("same_epochs", 1281167, 224, 256)
    demo = compose("pretrain", ["model=resnet18", "train=resnet_demo"])
    assert (demo.model.name, demo.model.input_size, demo.model.resize) == ("resnet18", 28, 32)
    assert demo.train.name == "resnet_demo" and demo.train.optimizer.momentum == 0.9
    wider = compose("pretrain", ["model=resnet18", "train=resnet_demo", "model.input_size=30"])
    assert wider.model.input_size == 30  # the command line still wins over the recipe
    for c in (cfg, demo):
        validate.check(c)
    with pytest.raises(UserError, match="model.zero_init_residual='yes': expected true or false"):
        validate.check(OmegaConf.merge(cfg, {"model": {"zero_init_residual": "yes"}}))
