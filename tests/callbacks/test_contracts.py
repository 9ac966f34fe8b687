"""The contracts between modules and callbacks (instaflow.contracts): declared, checked, and asked."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from instaflow.contracts import DescribesCouplings, Exportable, GathersForExport, SamplesGrid, SamplesImages, ShardingAware
from instaflow.contracts import TrainsNetworks


class _Plain(L.LightningModule):
    """A module that implements none of the contracts."""


class _Trainer:
    def __init__(self, callbacks):
        self.callbacks = callbacks


def test_the_stages_implement_what_their_callbacks_need():
    from lightning_modules.couplings import CouplingGeneration
    from lightning_modules.distill import DistillTraining
    from lightning_modules.embedded.autoencoder import AutoencoderTraining
    from lightning_modules.embedded.teacher import DiffusionTraining
    from lightning_modules.reflow import ReflowTraining

    # nothing loads in __init__, so the modules can be built from bare paths
    for m in (ReflowTraining("folder"), DistillTraining("folder")):
        for contract in (SamplesImages, SamplesGrid, Exportable, GathersForExport, TrainsNetworks):
            assert isinstance(m, contract), (type(m).__name__, contract.__name__)
        assert m.solver_tag == "euler"
    teacher = DiffusionTraining(vae="folder", unet={})
    assert isinstance(teacher, SamplesImages) and isinstance(teacher, SamplesGrid) and teacher.solver_tag == "dpm"
    vae = AutoencoderTraining(vae={})
    assert isinstance(vae, SamplesGrid) and isinstance(vae, Exportable) and not isinstance(vae, SamplesImages)
    assert isinstance(CouplingGeneration("folder"), DescribesCouplings)
    assert not isinstance(_Plain(), SamplesImages) and not isinstance(_Plain(), Exportable)


def test_flow_student_declares_loss_abstract():
    from lightning_modules.student import FlowStudent

    with pytest.raises(TypeError, match="loss"):
        FlowStudent("some/folder")

    class NoLoss(FlowStudent):
        pass

    with pytest.raises(TypeError, match="loss"):
        NoLoss("some/folder")

    class WithLoss(FlowStudent):
        def loss(self, batch, generator, dropout):
            return torch.zeros(())

    assert WithLoss("some/folder").hparams.init == "some/folder"  # nothing loads in __init__


@pytest.mark.parametrize("make", ["image_grid", "export", "quality"])
def test_callbacks_refuse_a_module_without_their_contract_at_setup(make):
    from callbacks.export import Export
    from callbacks.image_grid import ImageGrid
    from callbacks.quality import Quality
    from instaflow.evaluation.quality import EmbeddedFeatures, ShardPrompts

    cb = {"image_grid": lambda: ImageGrid(prompts=["a red circle"]), "export": lambda: Export("out"),
          "quality": lambda: Quality(ShardPrompts("none.tar"), EmbeddedFeatures())}[make]()
    with pytest.raises(TypeError, match="contracts"):
        cb.setup(None, _Plain(), "fit")


def test_export_best_asks_for_the_rebuild_contract():
    """Export(weights=best) needs ``contracts.ExportsFromState`` (asked with isinstance, not hasattr): a module that
    exports and gathers but cannot rebuild its network from a state dict is refused naming the contract."""
    from callbacks.export import Export
    from instaflow.contracts import ExportsFromState
    from lightning_modules.reflow import ReflowTraining

    class GathersOnly(L.LightningModule):
        def export_unet(self):
            return None

        def export(self, dirpath, unet=None):
            return dirpath

    assert isinstance(ReflowTraining("folder"), ExportsFromState) and not isinstance(GathersOnly(), ExportsFromState)
    with pytest.raises(TypeError, match="contracts.ExportsFromState"):
        Export("out", weights="best").setup(None, GathersOnly(), "fit")


def test_sharding_guard_asks_each_callback_not_its_class_name():
    from callbacks.ema import EMA
    from callbacks.image_grid import ImageGrid
    from instaflow.models.sharding import check_callbacks

    class RankZeroGrid(ImageGrid):  # a subclass or rename used to slip past a name check
        def supports_sharded_module(self) -> bool:
            return False

    class OwnRankZeroSampler:
        def supports_sharded_module(self) -> bool:
            return False

    class Fine:
        def supports_sharded_module(self) -> bool:
            return True

    assert not isinstance(EMA(), ShardingAware)
    for bad in (RankZeroGrid(prompts=["x"]), OwnRankZeroSampler()):
        with pytest.raises(ValueError, match="hang"):
            check_callbacks(_Trainer([EMA(), bad]))
    check_callbacks(_Trainer([EMA(), Fine()]))  # callbacks that say they are safe, or say nothing, pass
    check_callbacks(None)
