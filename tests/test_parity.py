"""Our networks are mmsegmentation's: same state_dict, same logits for the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from archs import one_per_family

from mirseg.models import MODELS, build_model

ARCHS = sorted(MODELS)


@pytest.fixture(scope="module")
def architectures(parity_dir):
    return json.loads((parity_dir / "architectures.json").read_text())


@pytest.mark.parametrize("name", ARCHS)
def test_state_dict_matches_mmseg(name, architectures):
    spec = architectures[name]
    model = build_model(name, spec["num_classes"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, list(s)) for k, s in spec["state_dict"]]
    missing = sorted(set(k for k, _ in theirs) - set(k for k, _ in ours))
    extra = sorted(set(k for k, _ in ours) - set(k for k, _ in theirs))
    assert not missing and not extra, f"missing {missing[:5]}..., extra {extra[:5]}..."
    assert ours == theirs  # shapes and module order
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == spec["num_params"]


def _filled(name, num_classes, fill, salt=""):
    model = build_model(name, num_classes)
    model.load_state_dict(fill.fill_state_dict(model.state_dict(), salt), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_mmseg(name, architectures, parity_dir, fill):
    spec = architectures[name]
    model = _filled(name, spec["num_classes"], fill, spec["salt"])
    x = fill.parity_input(spec["input_shape"], spec["salt"])
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"}
    ref = np.load(parity_dir / f"{name}.npz")["logits"]
    ours = out["out"].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", one_per_family(ARCHS))
@pytest.mark.parametrize("size", [(65, 97), (33, 50)])
def test_any_input_size(name, size, fill):
    model = _filled(name, 5, fill, salt="other")
    x = fill.parity_input((1, 3, *size), salt="other")
    with torch.no_grad():
        out = model(x)["out"]
    assert out.shape == (1, 5, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", one_per_family(ARCHS))
def test_train_mode_returns_weighted_aux(name):
    torch.manual_seed(0)
    model = build_model(name, 3).train()
    x = torch.randn(2, 3, 65, 97)
    out = model(x)
    aux = out["aux"]
    assert len(aux) == len(model.aux_weights)
    for logits in [out["out"], *aux]:
        assert logits.shape == (2, 3, 65, 97)
    loss = out["out"].mean() + sum(w * a.mean() for w, a in zip(model.aux_weights, aux))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter takes part in the training loss"


def test_aux_weights_follow_mmseg_configs():
    assert build_model("fastscnn", 2).aux_weights == (0.4, 0.4)
    assert build_model("deeplabv3plus_r18", 2).aux_weights == (0.4,)
    assert build_model("hrnet_w18s", 2).aux_weights == ()
    assert build_model("ocrnet_hr18s", 2).aux_weights == (0.4,)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="fastscnn"):
        build_model("fastscn", 2)


@pytest.mark.parametrize("name", one_per_family(ARCHS))
def test_inference_preparation_keeps_logits(name, fill):
    """BN folding and channels-last change the speed, not the answer."""
    from mirseg.predict import prepare_for_inference

    model = _filled(name, 4, fill, salt="fuse")
    x = fill.parity_input((1, 3, 65, 97), salt="fuse")
    with torch.no_grad():
        ref = model(x)["out"]
        fast = prepare_for_inference(model, channels_last=True)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        out = fast(x.contiguous(memory_format=torch.channels_last))["out"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
