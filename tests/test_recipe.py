"""icl.cli.recipe: the real-anatomy variant's command (one process, the held-out list, INIA19 from a path), and the
options that change it (--real-volumes, --set, --resume)."""
from __future__ import annotations

import shlex

import pytest

from icl.cli import recipe
from icl.options.train import parse_train_args


def _printed(capsys, argv: list[str]) -> dict[str, str]:
    assert recipe.main(argv) == 0
    words = shlex.split(capsys.readouterr().out.strip())
    start = words.index("train_3d.py") + 1
    assert "torch.distributed.run" not in words, "a candidate variant runs in one process"
    return dict(zip(words[start::2], words[start + 1::2]))


def test_the_real_variant_holds_out_the_benchmark_and_reads_the_scan_from_a_path(capsys):
    flags = _printed(capsys, ["--variant", "real"])
    assert flags["-real_held_out"] == "1,1001,147,1147,45,1045,37,1037,7,1007"
    assert flags["-real_volumes"] == recipe.REAL_VOLUMES and not flags["-real_volumes"].startswith(("/", "datasets"))
    assert (flags["-config"], flags["-pretrain"], flags["-freeze"], flags["-feature_cache"]) == \
        ("medsam_lite_pool2", "litemedsam", "image_encoder", "auto")
    assert float(flags["-time_limit_min"]) <= 120
    tasks = flags["-tasks"]
    assert "real_sparse" in tasks and "real_cross" in tasks and "adjacent" in tasks and "sparse=" in tasks, \
        "look-alikes stay in the mix"
    cfg = parse_train_args([w for kv in flags.items() for w in kv], check_files=False)
    assert cfg.real_held_out == flags["-real_held_out"] and cfg.real_depth == 10


def test_options_change_the_printed_command(capsys):
    flags = _printed(capsys, ["--variant", "real", "--real-volumes", "a.nii.gz:b.nii.gz", "--set",
                              "time_limit_min=3", "image_size=128", "--resume", "runs/real/x"])
    assert flags["-real_volumes"] == "a.nii.gz:b.nii.gz" and flags["-time_limit_min"] == "3"
    assert flags["-image_size"] == "128" and flags["-resume"] == "runs/real/x"
    default = recipe.main(["--variant", "default"])
    assert default == 0 and "torch.distributed.run" in capsys.readouterr().out, "the default recipe keeps 2 ranks"
    with pytest.raises(SystemExit):
        recipe.main(["--variant", "real", "--set", "time_limit_min"])
