"""Command-line options of train_3d.py: MedSAM2-ICL flag compatibility, defaults, and one-line errors."""
from __future__ import annotations

import pytest

from conftest_train import override
from icl.options.common import DEFAULT_PRETRAIN
from icl.options.evaluate import EvalConfig, parse_eval_args
from icl.options.segment import SegmentOptions
from icl.options.train import TrainConfig, parse_train_args
from icl.options.spec import build_parser, str2bool
from icl.model.device import resolve_device
from icl.errors import InputError
from icl.cli.segment import parse_segment_args

BASE = ["-dataset", "phantom", "-pretrain", "none"]


def test_defaults_match_medsam2_icl():
    cfg = parse_train_args([], check_files=False)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.val_freq, cfg.lr, cfg.gpu_device, cfg.image_size, cfg.out_size) == (5, 5e-5, 0, 512, 512)
    assert (cfg.video_length, cfg.num_support, cfg.support_instance) == (12, 8, "case_00028.nii.gz")
    assert cfg.pretrain == DEFAULT_PRETRAIN and cfg.config == "sam2.1_hiera_t"
    assert cfg.distributed is False and cfg.wandb_enabled is True
    assert cfg.memory_selector == "recency" and cfg.freeze == "none" and cfg.resume is None
    assert cfg.data_path == "./datasets/kits"  # follows -dataset when not given
    assert cfg.support_case == "case_00028"


@pytest.mark.parametrize("word,value", [("True", True), ("true", True), ("1", True),
                                        ("False", False), ("false", False), ("0", False)])
def test_boolean_flags_accept_words_and_digits(word, value):
    cfg = parse_train_args(BASE + ["-distributed", word, "-wandb_enabled", word])
    assert cfg.distributed is value and cfg.wandb_enabled is value
    assert str2bool(word) is value


def test_values_are_typed_and_pretrain_none_means_random_init():
    cfg = parse_train_args(BASE + ["-exp_name", "run1", "-lr", "1e-4", "-image_size", "128", "-epochs", "3",
                                   "-freeze", "image_encoder,memory_encoder", "-seed", "7", "-fold", "2"])
    assert cfg.pretrain is None
    assert (cfg.exp_name, cfg.lr, cfg.image_size, cfg.epochs, cfg.seed, cfg.fold) == ("run1", 1e-4, 128, 3, 7, 2)
    assert cfg.frozen_parts == ["image_encoder", "memory_encoder"]
    d = cfg.to_dict()
    assert d["lr"] == 1e-4 and d["pretrain"] is None and set(d) >= {"exp_name", "dataset", "freeze", "resume"}


@pytest.mark.parametrize("argv,flag,text", [
    (["-dataset", "mnist"], "-dataset", "invalid choice"),
    (["-distributed", "maybe"], "-distributed", "True/False"),
    (["-wandb_enabled", "yes please"], "-wandb_enabled", "True/False"),
    (["-lr", "fast"], "-lr", "invalid float"),
    (["-lr", "0"], "-lr", "> 0"),
    (["-image_size", "100"], "-image_size", "multiple of 32"),
    (["-val_freq", "0"], "-val_freq", "> 0"),
    (["-fold", "5", "-folds", "5"], "-fold", "[0, 5)"),
    (["-freeze", "trunk"], "-freeze", "unknown part"),
    (["-amp", "fp8"], "-amp", "invalid choice"),
    (["-exp_name", "a/b"], "-exp_name", "letters"),
    (["-no_such_flag", "1"], "arguments", "unrecognized"),
    (["-memory_selector", "telepathy"], "-memory_selector", "unknown policy"),
    (["-config", "no_such_model"], "-config", "not found"),
])
def test_bad_values_raise_input_error_naming_the_flag(argv, flag, text):
    with pytest.raises(InputError) as err:
        parse_train_args(override(BASE, argv))  # the test's value in place of BASE's (a flag twice is an error)
    assert err.value.where == flag
    assert text in err.value.problem


def test_missing_pretrain_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(InputError) as err:
        parse_train_args(["-dataset", "phantom", "-pretrain", str(tmp_path / "MedSAM2_pretrain.pth")])
    assert err.value.where == "-pretrain"
    assert "checkpoint/README.md" in err.value.problem and "-pretrain none" in err.value.problem


def test_existing_pretrain_file_is_kept(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert parse_train_args(["-dataset", "phantom", "-pretrain", str(weights)]).pretrain == str(weights)


def test_missing_data_path_and_resume_and_config(tmp_path):
    with pytest.raises(InputError) as err:
        parse_train_args(["-dataset", "kits", "-pretrain", "none", "-data_path", str(tmp_path / "nope")])
    assert err.value.where == "-data_path" and "does not exist" in err.value.problem
    with pytest.raises(InputError) as err:
        parse_train_args(BASE + ["-resume", str(tmp_path / "gone")])
    assert err.value.where == "-resume"
    with pytest.raises(InputError) as err:
        parse_train_args(BASE + ["-config", str(tmp_path / "model.yaml")])
    assert err.value.where == "-config"


def test_eval_config_shares_the_common_fields():
    cfg = parse_eval_args(BASE + ["-protocol", "full_volume", "-image_size", "256", "-wandb_enabled", "false"])
    assert isinstance(cfg, EvalConfig) and not isinstance(cfg, TrainConfig)
    assert (cfg.protocol, cfg.image_size, cfg.wandb_enabled, cfg.pretrain) == ("full_volume", 256, False, None)
    with pytest.raises(InputError):
        parse_eval_args(BASE + ["-epochs", "3"])  # a training-only flag


def test_device_helper(capsys, monkeypatch):
    import torch

    assert resolve_device(-1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(0) == "cpu"
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(1) == "cuda:1"
    with pytest.raises(InputError) as err:
        resolve_device(3, "-gpu_device")
    assert err.value.where == "-gpu_device"
    # one rule for -gpu_device N and --device cpu|cuda[:N]
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda:0" and resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(InputError, match="expected cpu, cuda or cuda:N") as err:
            resolve_device(bad)
        assert err.value.where == "--device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda:0") == "cpu"


# ----------------------------------------------------------------------------------------------------- one options module
def _actions(parser) -> dict[str, object]:
    return {a.dest: a for a in parser._actions}


def test_the_three_parsers_come_from_the_same_field_definitions():
    from icl.cli.segment import build_parser as segment_parser

    parsers = {"-": [build_parser(TrainConfig), build_parser(EvalConfig)], "--": [segment_parser()]}
    for dest, spelled in (("amp", ("-amp", "--amp")), ("memory_selector", ("-memory_selector", "--memory-selector")),
                          ("image_size", ("-image_size", "--image-size")), ("config", ("-config", "--config"))):
        seen = []
        for dashes, flag in zip(("-", "--"), spelled):
            for parser in parsers[dashes]:
                action = _actions(parser)[dest]
                assert action.option_strings == [flag]
                seen.append(action)
        assert len({a.help.split(";")[0].split(" (default: ")[0] for a in seen}) == 1, f"{dest}: one help text"
        if dest in ("amp", "memory_selector"):
            assert len({(a.default, a.help, a.metavar) for a in seen}) == 1, f"{dest}: one definition"
    assert _actions(parsers["-"][0])["amp"].metavar == "{auto,bf16,fp16,none}"
    # booleans: True/False words with one dash, a store-true switch with two
    assert _actions(parsers["-"][0])["distributed"].option_strings == ["-distributed"]
    assert _actions(parsers["--"][0])["quiet"].nargs == 0
    assert {f for f in SegmentOptions.__dataclass_fields__} >= {"support_label", "slice_axis", "quiet"}


def test_flag_errors_name_the_flag_as_each_command_spells_it():
    seg = ["--support", "s", "--support-label", "l", "--query", "q", "--out", "o"]
    for parse, argv, flag in (
        (parse_train_args, BASE + ["-image_size", "100"], "-image_size"),
        (parse_eval_args, BASE + ["-image_size", "100"], "-image_size"),
        (parse_train_args, BASE + ["-memory_selector", "scored:budget=x"], "-memory_selector"),
        (parse_eval_args, BASE + ["-memory_selector", "telepathy"], "-memory_selector"),
        (parse_eval_args, BASE + ["-amp", "fp8"], "-amp"),
        (parse_eval_args, BASE + ["-nsd_tolerance", "-1"], "-nsd_tolerance"),
        (parse_segment_args, seg + ["--amp", "fp8"], "--amp"),
        (parse_segment_args, seg + ["--slice-axis", "5"], "--slice-axis"),
        (parse_segment_args, seg + ["--image-size", "big"], "--image-size"),
        (parse_segment_args, seg[:2], "--support-label, --query, --out"),
    ):
        with pytest.raises(InputError) as err:
            parse(argv)
        assert err.value.where == flag, (argv, err.value)
    opts = parse_segment_args(seg + ["--quiet", "--image-size", "64"])
    assert opts.quiet is True and opts.image_size == 64 and opts.memory_selector == "recency" and opts.amp == "auto"


@pytest.mark.parametrize("word", ["none", "None", "null", "", "random"])
def test_none_means_random_init_everywhere(word, capsys):
    from icl.engine.checkpoint import resolve_weights
    from icl.model.weights import resolve_checkpoint

    assert parse_train_args(["-dataset", "phantom", "-pretrain", word]).pretrain is None
    assert resolve_weights(parse_eval_args(["-pretrain", word])) == [(None, None)]
    assert resolve_weights(parse_eval_args(["-checkpoint_path", word])) == [(None, None)]
    if word:  # segment: no --checkpoint (or an empty one) is the default model, a none word is random init
        opts = parse_segment_args(["--support", "s", "--support-label", "l", "--query", "q", "--out", "o",
                                   "--checkpoint", word])
        assert resolve_checkpoint(opts.checkpoint, opts.config) is None
        assert "--checkpoint none: random weights" in capsys.readouterr().err


def test_eval_weights_checkpoint_path_wins_over_pretrain(tmp_path):
    from icl.engine.checkpoint import resolve_weights

    pretrain, chosen = tmp_path / "pretrain.pth", tmp_path / "epoch_7.pth"
    for path in (pretrain, chosen):
        path.write_bytes(b"x")
    both = parse_eval_args(["-pretrain", str(pretrain), "-checkpoint_path", str(chosen)])
    assert resolve_weights(both) == [(7, chosen)]
    assert resolve_weights(parse_eval_args(["-pretrain", str(pretrain)])) == [(None, pretrain)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"x")
    assert resolve_weights(parse_eval_args(["-pretrain", str(pretrain), "-checkpoint_path", str(run)])) == \
        [(None, run / "last.pth")]
    (run / "best.pth").write_bytes(b"x")
    assert resolve_weights(parse_eval_args(["-checkpoint_path", str(run)])) == [(None, run / "best.pth")]
    with pytest.raises(InputError, match="checkpoint not found"):
        resolve_weights(parse_eval_args(["-pretrain", str(pretrain), "-checkpoint_path", str(tmp_path / "gone")]))
    shown = " ".join(build_parser(EvalConfig).format_help().split())  # eval_3d.py -h says the rule
    assert "-pretrain is used only when -checkpoint_path is left at its default" in shown


def test_one_memory_selector_rule():
    from icl.model.build import make_memory_selector
    from sam2_ext.errors import OptionError
    from sam2_ext.selector import MemorySelector

    for value in (None, "", "recency", " Recency "):
        assert make_memory_selector(value) is None
    selector = make_memory_selector("scored:budget=2")
    assert isinstance(selector, MemorySelector) and selector.config.budget == 2
    with pytest.raises(OptionError):
        make_memory_selector("recency:budget=2")


def test_help_texts_show_the_defaults():
    train = build_parser(TrainConfig).format_help()
    assert "AdamW learning rate (default: 5e-05)" in train and "(default: sam2.1_hiera_t)" in train
    seg = " ".join(build_parser(SegmentOptions).format_help().split())
    assert "(default: auto)" in seg and "the weights were trained with, else tiny_cpu" in seg
    assert "(default: None)" not in seg  # no default is not shown as one


def test_eval_help_explains_its_own_exp_name():
    text = " ".join(build_parser(EvalConfig).format_help().split())
    assert "the tables go to runs/eval/<exp_name>" in text and "run folder is" not in text
    assert parse_eval_args(BASE + ["-exp_name", "mine"], check_files=False).out_dir.endswith("eval/mine")


@pytest.mark.parametrize("parse,flag", [(lambda a: parse_train_args(BASE + a, check_files=False), "-memory_selector"),
                                        (lambda a: parse_eval_args(BASE + a, check_files=False), "-memory_selector")])
def test_oracle_selector_is_refused_on_the_command_line(parse, flag):
    """The oracle needs ground truth only Python code can attach: a command line is told so at once, not asked to
    call a Python method mid-run."""
    with pytest.raises(InputError) as err:
        parse([flag, "oracle:window=4"])
    assert err.value.where == flag and "no command line gives the model" in err.value.problem
    assert parse([flag, "scored:budget=2"]).memory_selector == "scored:budget=2"
    with pytest.raises(InputError, match="no command line gives the model"):
        parse_segment_args(["--support", "a", "--support-label", "b", "--query", "c", "--out", "d",
                            "--memory-selector", "oracle"])


def test_data_commands_help_shows_defaults(capsys):
    from icl.cli import phantom, preprocess

    for module, needles in ((preprocess, ("in-plane size in pixels (default: 128)",)),
                            (phantom, ("(default: 4)", "(default: 96,96,40)"))):
        with pytest.raises(SystemExit):
            module.main(["-h"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(n in text for n in needles), (module.__name__, text)
