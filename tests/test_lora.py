"""-peft lora: a fresh adapter changes nothing, merging reproduces the adapted model, checkpoints hold the adapters,
export loads with SAM2's own loader, resume restores the adapters exactly, bad flags are one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest_train import one_thread, train_argv, train_data  # noqa: F401  (fixtures)
from engine_fixtures import make_tiny_predictor, single_thread, toy_slices
from icl.options.train import parse_train_args
from icl.model import lora
from icl.engine.train import loop as T
from icl.model.weights import load_checkpoint
from icl.model.build import build_predictor
from icl.engine.train.loop import main, train
from icl.errors import InputError
from sam2_ext.build import build_icl_predictor
from sam2_ext.track import track


def _logits(model, frames, masks) -> torch.Tensor:
    return torch.stack([r.logits for r in track(model, frames, {0: {0: masks[0]}, 1: {1: masks[1]}}, "forward")])


@pytest.fixture
def clip():
    return toy_slices(4, 64)


def _randomize_adapters(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_fresh_adapters_leave_logits_exactly_unchanged(clip):
    with single_thread():
        model = make_tiny_predictor(0)
        before = _logits(model, *clip)
        names = lora.inject_lora(model, ["image_encoder", "memory_attention"], 8, 16)
        after = _logits(model, *clip)
    assert len(names) == 28 and all(".attn." in n or "_attn" in n for n in names)
    assert (after - before).abs().max().item() == 0.0
    _randomize_adapters(model)  # and the adapters are really in the forward pass
    with single_thread():
        assert (_logits(model, *clip) - before).abs().max().item() > 1e-3


def test_only_adapters_train_unless_freeze_names_parts():
    model = make_tiny_predictor(0)
    lora.inject_lora(model, ["memory_attention"], 4, 8)
    lora.set_trainable(model, None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("memory_attention.") for n in trainable)
    # 16 projections of the tiny memory attention, each r * (in + out) = 4 * (64 + 64) (cross-attn k/v read 64-d)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == \
        sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules()
            if n.endswith("base_layer") and n.startswith("memory_attention."))
    lora.set_trainable(model, ["image_encoder"])  # -freeze image_encoder: the other parts train in full too
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.sam_mask_decoder.parameters())


def test_merged_weights_reproduce_the_adapted_model(clip):
    with single_thread():
        model = make_tiny_predictor(0)
        lora.inject_lora(model, ["image_encoder", "memory_attention", "sam_mask_decoder"], 4, 8)
        _randomize_adapters(model)
        adapted = _logits(model, *clip)
        lora.merge_lora(model)
        merged = _logits(model, *clip)
        plain = make_tiny_predictor(0)
        assert set(model.state_dict()) == set(plain.state_dict()), "merged = plain SAM2 layout"
        plain.load_state_dict(model.state_dict())
        again = _logits(plain, *clip)
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert torch.equal(again, merged)


@pytest.fixture
def base_weights(tmp_path) -> Path:
    path = tmp_path / "base.pt"
    torch.save({"model": make_tiny_predictor(0).state_dict()}, path)
    return path


def test_lora_run_saves_adapters_exports_merged_and_resumes_exactly(train_data, tmp_path, base_weights,  # noqa: F811
                                                                     one_thread, monkeypatch):
    flags = ["-pretrain", str(base_weights), "-peft", "lora", "-lora_rank", "4", "-lora_targets",
             "image_encoder,memory_attention", "-epochs", "2"]
    ck = tmp_path / "ck"
    straight = train(parse_train_args(train_argv(train_data, ck, "straight", *flags, "-export",
                                                 str(tmp_path / "merged.pt"))))
    run = Path(straight["run_dir"])
    last = load_checkpoint(run / "last.pth")
    assert last["extra"]["peft"]["rank"] == 4 and all(k.startswith("lora::") for k in last["model"])
    assert (run / "last.pth").stat().st_size < 0.3 * base_weights.stat().st_size, "adapters alone: small"

    # the same run killed in epoch 2, then -resume: the same adapters bit for bit
    real_epoch = T.train_one_epoch

    def crash_in_epoch_2(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(run, epoch)

    monkeypatch.setattr(T, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(parse_train_args(train_argv(train_data, ck, "split", *flags)))
    monkeypatch.setattr(T, "train_one_epoch", real_epoch)
    (split,) = ck.glob("split_*")
    resumed = train(parse_train_args(train_argv(train_data, ck, "split", *flags, "-resume", str(split))))
    assert resumed["step"] == straight["step"] == 4
    again = load_checkpoint(split / "last.pth")
    assert again["model"].keys() == last["model"].keys()
    for key in last["model"]:
        assert torch.equal(again["model"][key], last["model"][key]), key

    # export: official {"model": ...} that the plain SAM2 builder loads, = the adapter checkpoint loaded and merged
    exported = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(exported["model"]) == set(make_tiny_predictor(0).state_dict())
    frames, masks = toy_slices(4, 64)
    official = build_icl_predictor("tiny_cpu", "cpu", checkpoint=tmp_path / "merged.pt").eval()
    from_adapters = build_predictor("tiny_cpu", "cpu", run / "best.pth", 128).eval()
    base = build_predictor("tiny_cpu", "cpu", base_weights, 128).eval()
    a, b = _logits(official, frames, masks), _logits(from_adapters, frames, masks)
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - _logits(base, frames, masks)).abs().max().item() > 0, "training moved the adapters"

    # the API (what icl.segment --checkpoint runs) and eval_3d.py take the adapter checkpoint as it is
    from icl.api import ICLSegmenter
    from icl.options.evaluate import parse_eval_args
    from icl.engine.eval.evaluate import evaluate

    api = ICLSegmenter(checkpoint=run / "best.pth", config="tiny_cpu", device="cpu", image_size=128)
    assert (_logits(api.predictor, frames, masks) - a).abs().max().item() <= 1e-5
    df, _ = evaluate(parse_eval_args([
        "-dataset", "phantom", "-data_path", str(train_data["data"]), "-cache_dir", str(train_data["cache"]),
        "-config", "tiny_cpu", "-image_size", "128", "-gpu_device", "-1", "-checkpoint_path", str(run / "best.pth"),
        "-num_support", "2", "-support_instance", "case_00000", "-protocol", "gt_slices", "-max_cases", "1",
        "-out_dir", str(tmp_path / "eval"), "-video_length", "3"]), progress=False)
    assert len(df) > 0 and df["checkpoint"].iloc[0].endswith("best.pth")


def test_adapter_checkpoint_needs_its_base_weights(train_data, tmp_path, base_weights, one_thread):  # noqa: F811
    out = train(parse_train_args(train_argv(train_data, tmp_path, "b", "-pretrain", str(base_weights), "-peft",
                                            "lora", "-lora_targets", "memory_attention", "-epochs", "1",
                                            "-steps_per_epoch", "1")))
    other = make_tiny_predictor(1)
    torch.save({"model": other.state_dict()}, base_weights)  # the base file changed under the adapters
    with pytest.raises(InputError, match="changed since it was trained"):
        build_predictor("tiny_cpu", "cpu", Path(out["run_dir"]) / "last.pth", 128)


@pytest.mark.parametrize("flags, where, words", [
    (["-peft", "lora", "-lora_targets", "image_encoder,memory_decoder"], "-lora_targets", "memory_decoder"),
    (["-peft", "lora", "-lora_targets", "memory_encoder"], "-lora_targets", "no part named memory_encoder"),
    (["-peft", "lora", "-lora_rank", "0"], "-lora_rank", "> 0"),
    (["-peft", "lora", "-lora_rank", "-4"], "-lora_rank", "> 0"),
    (["-feature_cache", "auto"], "-feature_cache", "frozen image encoder"),
    (["-peft", "lora", "-feature_cache", "auto"], "-feature_cache", "frozen image encoder"),
])
def test_bad_fine_tuning_flags_are_one_line(train_data, tmp_path, base_weights, capsys, flags, where,  # noqa: F811
                                            words, one_thread):
    argv = train_argv(train_data, tmp_path, "bad", "-epochs", "1", "-pretrain", str(base_weights), *flags)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {where}: ") and words in err[-1], err
    assert not list(tmp_path.glob("bad_*/*.pth")), "nothing trained"


def test_lora_needs_pretrained_weights(train_data, tmp_path, capsys, one_thread):  # noqa: F811
    assert main(train_argv(train_data, tmp_path, "nop", "-epochs", "1", "-peft", "lora")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: -peft: ")
