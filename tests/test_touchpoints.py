"""The places a ``sam2`` release can break this library (``sam2_ext.touchpoints``, ``docs/CONTRACTS.md``): each
signature as written against, and no private ``sam2`` method overridden without being listed."""
from __future__ import annotations

import importlib
import inspect

import pytest
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam2_ext.features import StoredFeatures
from sam2_ext.predictor import ICLPredictor
from sam2_ext.priors import MaskPriors
from sam2_ext.touchpoints import TOUCHPOINTS


@pytest.mark.parametrize("where", sorted(TOUCHPOINTS, key=str), ids=lambda w: ".".join(p for p in w if p))
def test_sam2_signature_is_the_one_written_against(where):
    module, cls, name = where
    owner = importlib.import_module(module)
    if cls is not None:
        owner = getattr(owner, cls, None)
        assert owner is not None, f"sam2 changed: {module}.{cls} is gone"
    target = getattr(owner, name, None)
    assert target is not None, f"sam2 changed: {'.'.join(p for p in where if p)} is gone"
    expected = TOUCHPOINTS[where][0]
    assert str(inspect.signature(target)) == expected, (
        f"sam2 changed the signature of {'.'.join(p for p in where if p)}: {inspect.signature(target)} "
        f"(written against {expected}); see docs/CONTRACTS.md")


def test_every_private_sam2_method_overridden_is_listed():
    listed = {name for (_, _, name) in TOUCHPOINTS}
    overridden = {name for cls in (ICLPredictor, StoredFeatures, MaskPriors) for name in vars(cls)
                  if name.startswith("_") and not name.startswith("__") and hasattr(SAM2VideoPredictor, name)}
    assert overridden and overridden <= listed, f"not in sam2_ext.touchpoints: {sorted(overridden - listed)}"
