"""The weights say what they were trained with (#16 items 6, 7): config and image size come from the checkpoint,
a different config is one clear error naming both, a different size one warning, a size that cannot fit is refused
before the model is built."""
from __future__ import annotations

import pytest
import torch

from icl.api import ICLSegmenter
from icl.errors import InputError, spell_flag
from icl.model.settings import check_image_memory, run_estimate, settle_model, trained_settings
from icl.cli.segment import main
from sam2_ext.build import build_icl_predictor


def _flag(name: str) -> str:
    return spell_flag(name, "--")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exported weights as ``-export`` writes them: ``{"model": ..., "trained": {"config": {flags}}}``."""
    path = tmp_path_factory.mktemp("w") / "tiny64.pth"
    model = build_icl_predictor("tiny_cpu", "cpu", image_size=64)
    torch.save({"model": model.state_dict(), "trained": {"config": {"config": "tiny_cpu", "image_size": 64}}}, path)
    official = path.parent / "official.pth"
    torch.save({"model": model.state_dict()}, official)
    return path, official


def test_settings_come_from_the_weights(exported):
    ours, official = exported
    assert trained_settings(ours) == {"config": "tiny_cpu", "image_size": 64}
    assert trained_settings(official) == {} and trained_settings(None) == {}
    assert settle_model(None, None, ours, "sam2.1_hiera_t", _flag) == ("tiny_cpu", 64, trained_settings(ours))
    assert settle_model(None, None, official, "sam2.1_hiera_t", _flag) == ("sam2.1_hiera_t", None, {})
    assert settle_model("cfg/tiny_cpu.yaml", None, ours, "x", _flag)[:2] == ("cfg/tiny_cpu.yaml", 64)  # same config


def test_another_config_is_one_error_naming_both(exported):
    with pytest.raises(InputError) as err:
        settle_model("sam2.1_hiera_t", None, exported[0], "tiny_cpu", _flag)
    assert err.value.where == "--config" and "tiny_cpu" in err.value.problem and "sam2.1_hiera_t" in err.value.problem


def test_another_image_size_is_a_warning(exported, capsys):
    assert settle_model(None, 128, exported[0], "tiny_cpu", _flag)[:2] == ("tiny_cpu", 128)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--image-size 64; at 128" in err


def test_the_api_builds_what_the_weights_were_trained_with(exported):
    seg = ICLSegmenter(checkpoint=exported[0])  # no config, no image size
    assert seg.predictor.image_size == 64


def test_an_image_size_that_cannot_fit_is_refused_up_front(tmp_path, capsys):
    with pytest.raises(InputError, match=r"image size 8192 needs about 18\.0 GiB .* 1\.0 GiB is free"):
        check_image_memory("tiny_cpu", 8192, "--image-size", available=2**30)
    check_image_memory("tiny_cpu", 128, "--image-size", available=2**30)  # 128 px fits easily
    out = tmp_path / "p.nii.gz"
    s = tmp_path / "s.nii.gz"
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), str(s))
    lab = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), str(lab))
    assert main(["--support", str(s), "--support-label", str(lab), "--query", str(s), "--out", str(out),
                 "--checkpoint", "none", "--image-size", "131072", "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--image-size" in errors[0] and "GiB" in errors[0] and not out.exists()


def test_the_run_estimate_reads_a_tinyvit_encoder_as_well_as_hiera():
    """The whole-run estimate (memory and time, said before a long run) for LiteMedSAM's config: TinyViT has no
    Hiera trunk; its widest full-resolution map is what the activations scale with."""
    tiny = run_estimate("tiny_cpu", 128, (64, 64, 32), 4, 32)
    lite = run_estimate("medsam_lite", 128, (64, 64, 32), 4, 32)
    assert lite[0] > tiny[0] and lite[1] > tiny[1] > 0
    assert run_estimate("medsam_lite", 64, (64, 64, 32), 4, 32)[1] < lite[1]
