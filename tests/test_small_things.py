"""Issue #27's smaller things, each as the user hit it: a classic fill announces no model, a bad file of a query
folder does not stop the others, negative window values need no '=', the training log shows a small lr, the data
is checked before the weights, caches of two image sizes are not mixed."""
from __future__ import annotations

import json

import pytest

from icl.cli.segment import main
from icl.data.loaders import open_caches
from icl.engine.train.loop import shown_value
from icl.errors import InputError
from icl.options.train import parse_train_args
from safety_fixtures import write_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("small"))


def _segment(case, query, out, *extra) -> int:
    return main(["--support", str(case["scan"]), "--support-label", str(case["drawn"]), "--query", str(query),
                 "--out", str(out), "--quiet", *extra])


def test_classic_fills_announce_no_model(case, tmp_path, capsys):
    for fill in ("interpolation", "nearest"):
        assert _segment(case, case["scan"], tmp_path / f"{fill}.nii.gz", "--fill", fill) == 0
        assert "default model" not in capsys.readouterr().err


def test_a_bad_file_in_a_query_folder_is_named_and_the_rest_segmented(case, tmp_path, capsys):
    folder = tmp_path / "queries"
    folder.mkdir()
    (folder / "scan.nii.gz").write_bytes(case["scan"].read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"not a nifti at all")
    (folder / "notes.txt").write_text("scanned on Tuesday")
    assert _segment(case, folder, tmp_path / "out", "--fill", "interpolation", "--window", "-100,200") == 0
    err = capsys.readouterr().err
    assert "notes.txt (not a scan file)" in err
    assert "warning:" in err and "broken.nii.gz" in err and "not segmented" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.nii.gz"]


def test_negative_window_values_need_no_equals_sign(case, tmp_path, capsys):
    from icl.cli.segment import parse_segment_args
    opts = parse_segment_args(["--support", "s", "--support-label", "l", "--query", "q", "--out", "o",
                               "--window", "-100,200"])
    assert opts.window == (-100.0, 200.0)


def test_training_log_shows_a_small_lr():
    assert shown_value(5e-5) == "5e-05" and shown_value(0.8123) == "0.8123" and shown_value(0.0) == "0.0000"


def test_missing_data_is_named_before_missing_weights(tmp_path):
    with pytest.raises(InputError) as err:
        parse_train_args(["-dataset", "kits", "-data_path", str(tmp_path / "nope"),
                          "-pretrain", str(tmp_path / "none.pth")])
    assert err.value.where == "-data_path"


def test_caches_of_two_image_sizes_are_not_mixed(tmp_path):
    for name, size in (("small", 128), ("large", 512)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text(json.dumps(
            {"dataset": "kits", "image_size": size, "cases": [], "label_map": {"1": "kidney"}}))
    with pytest.raises(InputError, match="different image sizes.*128 px.*512 px"):
        open_caches([tmp_path / "small", tmp_path / "large"])


def test_train_and_eval_refuse_a_flag_given_twice():
    """#27 item 8, the seed's spelling too: ``-lr 1e-3 -lr 5e-5`` is an error naming the flag, never the last."""
    from icl.errors import InputError
    from icl.options.evaluate import parse_eval_args
    from icl.options.train import parse_train_args

    with pytest.raises(InputError, match=r"^-lr: given more than once"):
        parse_train_args(["-lr", "1e-3", "-lr", "5e-5"], check_files=False)
    with pytest.raises(InputError, match=r"^-protocol: given more than once"):
        parse_eval_args(["-protocol", "both", "-protocol", "gt_slices"], check_files=False)
