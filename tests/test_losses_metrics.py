"""Losses and metrics on tiny tensors whose values were worked out by hand."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import kidneyseg_utils as ku


def _reference(module: str):
    """Import a reference implementation (MONAI, a test requirement): a failure in CI, where
    requirements.txt installs it, and a skip saying why elsewhere."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:
        message = f"{module} not usable here ({type(exc).__name__}: {exc}); pip install -r requirements.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_metrics_from_counts_by_hand():
    # tp=6, fp=2, fn=4: dice 12/18, iou 6/12, precision 6/8, recall 6/10
    m = ku.metrics_from_counts(6, 2, 4)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["f1"] == pytest.approx(m["dice"])  # for pixel counts F1 equals Dice


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((0, 0, 0), dict(dice=1, iou=1, precision=1, recall=1, f1=1)),  # empty and predicted empty
        ((0, 5, 0), dict(dice=0, iou=0, precision=0, recall=0, f1=0)),  # false kidney
        ((0, 0, 5), dict(dice=0, iou=0, precision=0, recall=0, f1=0)),  # missed kidney
        ((5, 0, 0), dict(dice=1, iou=1, precision=1, recall=1, f1=1)),
    ],
)
def test_empty_mask_rules(counts, expected):
    assert ku.metrics_from_counts(*counts) == pytest.approx(expected)


def test_confusion_counts_numpy_and_torch_agree():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    true = np.array([[1, 0, 0], [1, 1, 0]], bool)
    c = ku.confusion_counts(pred, true)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert ku.confusion_counts(torch.from_numpy(pred), torch.from_numpy(true)) == c
    assert (c + c).tp == 4
    with pytest.raises(ValueError, match="shape"):
        ku.confusion_counts(pred, true[:, :2])


def test_focal_loss_by_hand():
    zero = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    # p = 0.5 everywhere: bce = ln 2, (1 - p_t)^2 = 0.25; alpha_t = 0.25 and 0.75
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)) / 2
    assert ku.focal_loss_with_logits(zero, target).item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 and alpha 0.5 give half the binary cross-entropy
    assert ku.focal_loss_with_logits(zero, target, alpha=0.5, gamma=0).item() == pytest.approx(
        0.5 * math.log(2), rel=1e-6
    )


def test_focal_loss_is_finite_for_extreme_fp16_logits():
    logits = torch.tensor([[[[-6e4, 6e4, 0.0, 3e4]]]], dtype=torch.float16)
    target = torch.tensor([[[[1.0, 0.0, 1.0, 1.0]]]])
    loss = ku.FocalDiceLoss()(logits, target)
    assert torch.isfinite(loss)
    assert loss.dtype == torch.float32


def test_soft_dice_loss_by_hand():
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    perfect = torch.tensor([[[[50.0, 50.0, -50.0, -50.0]]]])
    assert ku.soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # p = 0.5 everywhere: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4
    assert ku.soft_dice_loss(torch.zeros(1, 1, 1, 4), target).item() == pytest.approx(0.4)
    # empty target, confident empty prediction: loss near 0, not NaN
    empty = ku.soft_dice_loss(torch.full((1, 1, 2, 2), -50.0), torch.zeros(1, 1, 2, 2))
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def test_combined_loss_weights():
    logits, target = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    focal = ku.focal_loss_with_logits(logits, target)
    dice = ku.soft_dice_loss(logits, target)
    assert ku.FocalDiceLoss()(logits, target).item() == pytest.approx((0.6 * focal + 0.4 * dice).item())
    only_dice = ku.FocalDiceLoss(focal_weight=0.0, dice_weight=1.0)(logits, target)
    assert only_dice.item() == pytest.approx(dice.item())


def test_focal_loss_equals_monai_sigmoid_focal_loss():
    """MONAI's FocalLoss (sigmoid, ``alpha`` on the positive class, mean) is torchvision's
    ``sigmoid_focal_loss`` and Lin et al.'s formula; ours must agree with it."""
    losses = _reference("monai.losses")
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 1, 8, 8, generator=gen)
    target = (torch.rand(3, 1, 8, 8, generator=gen) > 0.6).float()
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (0.8, 3.0)):
        reference = losses.FocalLoss(gamma=gamma, alpha=alpha, reduction="mean")(logits, target)
        ours = ku.focal_loss_with_logits(logits, target, alpha=alpha, gamma=gamma)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_hd95_agrees_with_monai():
    metrics = _reference("monai.metrics")
    import cv2

    rng = np.random.default_rng(0)
    for i in range(8):
        pred, true = np.zeros((64, 80), np.uint8), np.zeros((64, 80), np.uint8)
        for mask, angle in ((pred, 0), (true, 30)):
            centre = (int(rng.integers(20, 60)), int(rng.integers(20, 44)))
            axes = (int(rng.integers(5, 15)), int(rng.integers(5, 15)))
            cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
        if i % 2:
            cv2.circle(true, (5, 5), 3, 1, -1)  # a second, distant component
        reference = metrics.compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None].float(),
            torch.from_numpy(true)[None, None].float(),
            include_background=True,
            percentile=95,
        ).item()
        # MONAI's outline comes from a 4-connected erosion, ours from an 8-connected one (one pixel
        # thicker on diagonals); the 95th percentiles then differ by well under a pixel.
        assert ku.hausdorff95(pred, true) == pytest.approx(reference, abs=1.0)
