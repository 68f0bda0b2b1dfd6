"""Whole and sliding-window prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mirseg.infer import predict_logits, predict_proba, sliding_window
from mirseg.models import build_model


def test_slide_matches_mmseg(parity_dir, fill):
    model = build_model("fastscnn", 19)
    model.load_state_dict(fill.fill_state_dict(model.state_dict()))
    x = fill.parity_input((2, 3, 64, 128))
    ours = predict_logits(model, x, mode="slide", crop_size=(48, 48), stride=(32, 32)).numpy()
    ref = np.load(parity_dir / "fastscnn_slide_crop48_stride32.npz")["logits"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


class _Position(nn.Module):
    """A 'model' whose logits are the input itself: slide results can be computed by hand."""

    def forward(self, x):
        return {"out": x}


@pytest.mark.parametrize("size", [(10, 13), (4, 5), (7, 7)])
def test_slide_of_identity_is_identity(size):
    # Averaging identical copies of a pixel gives the pixel back, whatever the window layout;
    # this covers clipped border windows and images smaller than the crop.
    x = torch.randn(2, 3, *size)
    out = sliding_window(_Position(), x, crop_size=(6, 6), stride=(4, 3), max_batch=3)
    torch.testing.assert_close(out, x)


def test_slide_window_count_is_mmsegs():
    counted = []

    class Count(nn.Module):
        def forward(self, x):
            counted.append(x.shape)
            return {"out": torch.zeros(x.shape[0], 2, *x.shape[2:])}

    sliding_window(Count(), torch.zeros(1, 3, 64, 128), (48, 48), (32, 32), max_batch=100)
    # rows: ceil((64-48)/32)+1 = 2, cols: ceil((128-48)/32)+1 = 4
    assert counted == [torch.Size([8, 3, 48, 48])]


def test_predict_logits_restores_train_mode_and_checks_mode():
    model = build_model("fastscnn", 3).train()
    x = torch.randn(1, 3, 32, 48)
    out = predict_logits(model, x)
    assert out.shape == (1, 3, 32, 48) and model.training
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(model, x, mode="slide")
    with pytest.raises(ValueError, match="unknown inference mode"):
        predict_logits(model, x, mode="tiles")


def test_predict_proba_sums_to_one_at_requested_size():
    p = predict_proba(torch.randn(2, 4, 8, 8), size=(16, 12))
    assert p.shape == (2, 4, 16, 12)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 16, 12))
