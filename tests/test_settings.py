"""The typed settings' own checks (settings.py): each range is accepted up to its edge and
refused past it, naming the key."""

from __future__ import annotations

import pytest

from cwps_lightning.settings import (
    CWPSSettings,
    LoggerSettings,
    OptimSettings,
    PiggybackSettings,
    StageSettings,
    T0Settings,
    TAPSSettings,
)


def test_a_mask_fit_of_one_epoch_is_accepted():
    stages = StageSettings(0, 0.25, 0.75)
    assert stages.mask_epochs == 1 and stages.total_epochs == 1


def test_zero_iterations_are_refused_in_joint_mode():
    assert CWPSSettings(mode="joint", iterations=1).iterations == 1
    with pytest.raises(ValueError, match=r"^cwps\.iterations must be >= 1, got 0$"):
        CWPSSettings(mode="joint", iterations=0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), -1e40, 1e39])
def test_a_non_finite_init_scale_is_refused(scale):
    """(float32's: the constant -1e40 overflowed when the mask was made, after T0)"""
    assert CWPSSettings(mask_init="constant", init_scale=-2.5).init_scale == -2.5
    assert CWPSSettings(mask_init="constant", init_scale=-3e38).init_scale == -3e38
    with pytest.raises(ValueError, match=r"^cwps\.init_scale must be a finite number \(float32"):
        CWPSSettings(mask_init="constant", init_scale=scale)


@pytest.mark.parametrize("init", ["log_standardized", "standardized", "mean_ratio", "random"])
def test_a_scale_or_std_at_or_below_zero_is_refused(init):
    """(-1 ran: the init turned around, the channels nearest their parent started
    task-specific, and the digits job's CWPS mean fell from 60 to 20)"""
    assert CWPSSettings(mask_init=init, init_scale=0.5).init_scale == 0.5
    for scale in (-1.0, 0.0):
        with pytest.raises(ValueError, match=rf"^cwps\.init_scale must be > 0 \(or null\) for "
                                             rf"cwps\.mask_init={init}, a factor or std; got "
                                             rf"{scale} \(any finite logit for "
                                             rf"mask_init=constant\)$"):
            CWPSSettings(mask_init=init, init_scale=scale)


def test_a_baseline_is_a_known_name_or_module_colon_class():
    assert CWPSSettings(baselines=["mymethods:MyMethod"]).baselines == ["mymethods:MyMethod"]
    with pytest.raises(ValueError, match=r"^cwps\.baselines has unknown entries \['pkg\.mod'\]"):
        CWPSSettings(baselines=["pkg.mod"])


def test_a_baseline_listed_twice_is_refused():
    with pytest.raises(ValueError, match=r"^cwps\.baselines lists a method twice"):
        CWPSSettings(baselines=["finetune", "taps", "finetune"])


def test_taps_settings_edges():
    taps = TAPSSettings(lam=0.0, penalty_from_epoch=0, weight_decay=0.0)
    assert (taps.lam, taps.penalty_from_epoch) == (0.0, 0)
    with pytest.raises(ValueError, match=r"^methods\.taps\.penalty_from_epoch must be >= 0, got -1$"):
        TAPSSettings(penalty_from_epoch=-1)
    with pytest.raises(ValueError, match=r"^methods\.taps\.lam must be a finite number >= 0"):
        TAPSSettings(lam=-0.1)
    with pytest.raises(ValueError, match=r"^methods\.taps\.optimizer must be one of"):
        TAPSSettings(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"^methods\.piggyback\.optimizer must be one of"):
        PiggybackSettings(optimizer="rmsprop")


def test_t0_needs_an_epoch():
    assert T0Settings(epochs=1).epochs == 1
    with pytest.raises(ValueError, match=r"^t0\.epochs must be >= 1, got 0$"):
        T0Settings(epochs=0)


def test_optim_momentum_is_checked():
    assert OptimSettings(momentum=0.0, mask_lr=0.0, weight_decay=0.0).momentum == 0.0
    with pytest.raises(ValueError, match=r"^optim\.momentum must be a finite number >= 0"):
        OptimSettings(momentum=-0.9)
    for momentum in (1.0, 1.5):  # (1.5 ran; every method's training collapsed)
        with pytest.raises(ValueError, match=rf"^optim\.momentum must be in \[0, 1\), got "
                                             rf"{momentum}$"):
            OptimSettings(momentum=momentum)


@pytest.mark.parametrize("mode", ["online", "offline", "disabled"])
def test_logger_takes_every_wandb_mode(mode):
    assert LoggerSettings(kind="wandb", mode=mode).mode == mode


def test_logger_refuses_another_wandb_mode():
    with pytest.raises(ValueError, match=r"^logger\.mode must be one of"):
        LoggerSettings(kind="wandb", mode="dryrun")
