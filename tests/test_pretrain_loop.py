"""The training loop: schedules, exact resume, DDP with gloo on 2 CPU ranks, checkpoints, the CLI end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.config import VIT_PRESETS
from hctembed.index.store import Store
from hctembed.io.archive import discover
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain import PretrainConfig, PretrainError, run_pretrain
from hctembed.pretrain.dino import DINOHead, DINOHeadConfig, DINOStudent
from hctembed.pretrain.mae import MAEConfig
from hctembed.pretrain.schedules import build_schedules, cosine_schedule
from hctembed.synth import generate_archive
from hctembed.synth.protocol import SynthConfig

TINY_DINO = PretrainConfig(
    method="dino", model="vit-micro", epochs=2, batch_size=2, prototypes=64, head_hidden=64, bottleneck=32,
    local_crops=1, lr=1e-3, checkpoint_every=100,
)  # fmt: skip
TINY_MAE = replace(TINY_DINO, method="mae", mae=MAEConfig(decoder_dim=48, decoder_depth=1, decoder_heads=4))
TINY_SIMCLR = replace(TINY_DINO, method="simclr")


def shared_archive(tmp_path_factory, n: int = 4) -> Path:
    root = tmp_path_factory.getbasetemp() / f"pretrain-archive-{n}"
    if not (root / "labels.csv").exists():
        generate_archive(root, n=n, seed=3, config=SynthConfig(matrix=64))
    return root


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return discover(shared_archive(tmp_path_factory))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "pretrain-cache"


def test_cosine_schedule_formula():
    s = cosine_schedule(base=1.0, final=0.1, total_steps=10, warmup_steps=3)
    np.testing.assert_allclose(s[:3], [0.0, 1 / 3, 2 / 3])
    for i in range(7):
        assert s[3 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / 7)))
    sched = build_schedules(
        method="dino", total_steps=20, peak_lr=1e-3, min_lr=1e-6, warmup_steps=2, weight_decay=0.05,
        teacher_temp_warmup_steps=5,
    )  # fmt: skip
    assert sched.momentum[0] == pytest.approx(0.996) and sched.momentum[-1] > 0.9999
    np.testing.assert_allclose(sched.teacher_temp[:5], np.linspace(0.04, 0.07, 5))
    assert (sched.teacher_temp[5:] == 0.07).all() and (sched.weight_decay == 0.05).all()


def _states(result) -> dict[str, torch.Tensor]:
    return {**{"t." + k: v for k, v in result.backbone.state_dict().items()}, **result.trained.state_dict()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        TINY_DINO,
        replace(TINY_DINO, head_bn=True, intensity_jitter=False, centering="sinkhorn", koleo=0.1),
        TINY_MAE,
        TINY_SIMCLR,
    ],
    ids=["dino", "dino-bn-head-sinkhorn-koleo", "mae", "simclr"],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(refs, cache, tmp_path, config):
    full = run_pretrain(refs=refs, config=replace(config, max_steps=4), out=tmp_path / "full", cache_dir=cache)
    half = run_pretrain(refs=refs, config=replace(config, max_steps=2), out=tmp_path / "cut", cache_dir=cache)
    assert half.steps_done == 2
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)  # safe to read back
    assert ckpt["step"] == 2 and {"student", "optimizer", "rng", "config"} <= set(ckpt)
    if config.method == "dino":
        assert {"teacher", "loss"} <= set(ckpt) and ckpt["loss"]["center"].abs().sum() > 0
    resumed = run_pretrain(
        refs=refs, config=replace(config, max_steps=4), out=tmp_path / "cut", resume=True, cache_dir=cache
    )
    assert resumed.steps_done == 4 and full.steps_done == 4
    a, b = _states(full), _states(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.last["loss"] == full.last["loss"]
    lines = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all("lr" in r and "loss" in r for r in lines)
    if config.method == "dino":
        assert all("teacher_temp" in r for r in lines)
        assert all(("koleo" in r) == (config.koleo > 0) for r in lines)
    if config.method == "simclr":
        assert all(0.0 <= r["pair_top1"] <= 1.0 and "pair_cosine" in r and "embedding_std" in r for r in lines)


def test_resume_refuses_other_settings(refs, cache, tmp_path):
    run_pretrain(refs=refs, config=replace(TINY_MAE, max_steps=1), out=tmp_path, cache_dir=cache)
    with pytest.raises(PretrainError, match="batch_size"):
        run_pretrain(refs=refs, config=replace(TINY_MAE, batch_size=1), out=tmp_path, resume=True, cache_dir=cache)


def test_dino_only_settings_are_refused_where_they_cannot_act():
    with pytest.raises(PretrainError, match="at least 2 scans"):
        replace(TINY_DINO, koleo=0.1, batch_size=1)
    with pytest.raises(PretrainError, match="DINO settings"):
        replace(TINY_MAE, centering="sinkhorn")
    with pytest.raises(PretrainError, match="unknown centering"):
        replace(TINY_DINO, centering="mean")
    with pytest.raises(PretrainError, match="simclr has no teacher"):
        replace(TINY_SIMCLR, koleo=0.1)
    with pytest.raises(PretrainError, match="negatives"):
        replace(TINY_SIMCLR, batch_size=1)
    with pytest.raises(PretrainError, match="temperature"):
        replace(TINY_SIMCLR, temperature=0.0)


def test_cli_simclr_run_exports_the_encoder_its_checkpoint_holds(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from hctembed.pretrain.export import export_from_checkpoint

    archive = shared_archive(tmp_path_factory)
    out = tmp_path / "run"
    args = ["pretrain", archive, "--method", "simclr", "--config", "vit-micro", "--out", out, "--epochs", "1"]
    args += ["--max-steps", "2", "--batch-size", "2", "--temperature", "0.2", "--pair-crop-mm", "96,192", "--quiet"]
    bad = CliRunner().invoke(app, [str(a) for a in args[:-3]] + ["--pair-crop-mm", "96"])
    assert bad.exit_code == 2 and "LO,HI" in bad.output
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert json.loads(ckpt["config"])["temperature"] == 0.2
    assert json.loads(ckpt["config"])["pair_crop_mm"] == [96.0, 192.0]
    assert any(k.startswith("projector.") for k in ckpt["student"])  # the projector trains but is not exported
    again = export_from_checkpoint(out / "checkpoint.pt", tmp_path / "again")
    exported, reexported = load_file(str(out / "encoder.safetensors")), load_file(str(again))
    assert exported.keys() == reexported.keys() and not any(k.startswith("projector.") for k in exported)
    assert all(torch.equal(exported[k], reexported[k]) for k in exported)
    card = json.loads((out / "encoder.json").read_text())
    assert card["card"]["method"] == "simclr" and card["card"]["exported_from"] == "encoder"
    assert card["card"]["temperature"] == 0.2
    assert card["card"]["pair_crop_mm"] == [96.0, 192.0] and card["card"]["pair_intensity_jitter"] is False


def test_checkpoint_from_before_a_new_setting_resumes(refs, cache, tmp_path):
    """A checkpoint written before head_bn / intensity_jitter existed had their defaults: it still resumes; a
    run asking for a non-default value of such a setting is refused."""
    run_pretrain(refs=refs, config=replace(TINY_DINO, max_steps=1), out=tmp_path, cache_dir=cache)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = json.loads(ckpt["config"])
    del old["head_bn"], old["intensity_jitter"], old["mae"]["target"], old["mae"]["histogram_bins"]  # nested too
    del old["pair_intensity_jitter"], old["pair_crop_mm"]
    ckpt["config"] = json.dumps(old, sort_keys=True)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(PretrainError, match="head_bn"):
        run_pretrain(refs=refs, config=replace(TINY_DINO, head_bn=True, max_steps=2), out=tmp_path, resume=True,
                     cache_dir=cache)  # fmt: skip
    with pytest.raises(PretrainError, match=r"\(mae\)"):
        other = replace(TINY_DINO.mae, histogram_bins=8)
        run_pretrain(refs=refs, config=replace(TINY_DINO, mae=other, max_steps=2), out=tmp_path, resume=True,
                     cache_dir=cache)  # fmt: skip
    resumed = run_pretrain(
        refs=refs, config=replace(TINY_DINO, max_steps=2), out=tmp_path, resume=True, cache_dir=cache
    )
    assert resumed.steps_done == 2


def test_too_few_scans_is_a_clear_error(refs, cache, tmp_path):
    with pytest.raises(PretrainError, match="too few"):
        run_pretrain(refs=refs[:1], config=TINY_MAE, out=tmp_path, cache_dir=cache)


def _ddp_worker(rank: int, world: int, rendezvous: str, refs, cache: str, out: str, config) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = run_pretrain(refs=refs, config=config, out=Path(out), cache_dir=Path(cache))
        torch.save(_states(result), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_ranks_identical_and_match_single_process(refs, cache, tmp_path):
    config = replace(TINY_DINO, batch_size=1, max_steps=3)  # 2 ranks x 1 = the single run's batch of 2
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdv"), refs, str(cache), str(out), config), nprocs=2, join=True)
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    single = run_pretrain(refs=refs, config=replace(config, batch_size=2), out=tmp_path / "one", cache_dir=cache)
    s = _states(single)
    for key in r0:  # float summation order differs; Adam's normalised steps amplify that to ~1e-5 here
        torch.testing.assert_close(r0[key], s[key], rtol=1e-3, atol=1e-4, msg=key)
    torch.manual_seed(config.seed)  # the loop's initial student, to check that training moved it
    head = DINOHeadConfig(out_dim=config.prototypes, hidden_dim=config.head_hidden, bottleneck_dim=config.bottleneck)
    initial = DINOStudent(ViT3D(VIT_PRESETS["vit-micro"]), DINOHead(96, head)).state_dict()
    assert not torch.equal(initial["backbone.patch_embed.weight"], r0["backbone.patch_embed.weight"])
    assert (out / "encoder.safetensors").exists()  # written by rank 0 only
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_cli_pretrain_then_embed_stores_the_card(tmp_path_factory, tmp_path):
    archive = shared_archive(tmp_path_factory)
    runner = CliRunner()
    out = tmp_path / "run"
    held_out = sorted(r.scan_id for r in discover(archive))[-1]  # a held-out patient's scan stays unseen
    scans = tmp_path / "train.txt"
    scans.write_text("".join(f"{r.scan_id}\n" for r in discover(archive) if r.scan_id != held_out))
    args = ["pretrain", archive, "--method", "dino", "--config", "vit-micro", "--out", out, "--epochs", "1"]
    args += ["--max-steps", "1", "--batch-size", "2", "--prototypes", "256", "--local-crops", "1", "--quiet"]
    args += ["--scans", scans, "--head-bn", "--no-intensity-jitter", "--centering", "sinkhorn", "--koleo", "0.1"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert held_out not in ckpt["scan_ids"] and len(ckpt["scan_ids"]) == 3
    saved = json.loads(ckpt["config"])
    assert saved["head_bn"] is True and saved["intensity_jitter"] is False
    assert saved["centering"] == "sinkhorn" and saved["koleo"] == 0.1
    assert any("head.mlp.1.running_mean" in k for k in ckpt["student"])  # the head's BatchNorm is there
    weights = out / "encoder.safetensors"
    assert weights.exists() and (out / "checkpoint.pt").exists()
    db = tmp_path / "h.duckdb"
    args = ["embed", archive, "--db", db, "--model", "vit-micro", "--weights", weights, "--workers", "0", "--quiet"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        card = store.models.get(store.resolve_collection().model_id).card
    assert card["method"] == "dino" and card["data_count"] == 3 and card["epochs"] == 1 and card["steps"] == 1
    assert card["fingerprint"].startswith("pp-") and card["exported_from"] == "teacher"
    bad = runner.invoke(app, ["pretrain", str(archive), "--method", "byol", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    bad = runner.invoke(app, ["pretrain", str(archive), "--centering", "mean", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown centering 'mean'" in bad.output
    mae = ["pretrain", archive, "--method", "mae", "--config", "vit-micro", "--out", tmp_path / "mae", "--epochs", "1"]
    mae += ["--max-steps", "1", "--batch-size", "2", "--norm-pix-loss", "--quiet"]
    assert runner.invoke(app, [str(a) for a in mae]).exit_code == 0
    saved = json.loads(torch.load(tmp_path / "mae" / "checkpoint.pt", weights_only=True)["config"])
    assert saved["mae"]["norm_pix_loss"] is True
    mae[mae.index("--norm-pix-loss")] = "--mae-target"
    mae[mae.index("--mae-target") + 1 : mae.index("--mae-target") + 1] = ["histogram", "--mask-ratio", "0.5"]
    mae[mae.index(tmp_path / "mae")] = tmp_path / "mae-histogram"
    assert runner.invoke(app, [str(a) for a in mae]).exit_code == 0
    saved = json.loads(torch.load(tmp_path / "mae-histogram" / "checkpoint.pt", weights_only=True)["config"])
    assert saved["mae"]["target"] == "histogram" and saved["mae"]["mask_ratio"] == 0.5
    card = json.loads((tmp_path / "mae-histogram" / "encoder.json").read_text())["card"]
    assert card["mae_target"] == "histogram" and card["mask_ratio"] == 0.5  # the card says what the loss asked for
    bad = runner.invoke(app, [str(a) for a in [*mae, "--norm-pix-loss"]])
    assert bad.exit_code == 2 and "pixels only" in bad.output
    bad = runner.invoke(app, [str(a) for a in [*mae[:-1], "--mae-target", "hog", "--quiet"]])
    assert bad.exit_code == 2 and "use pixels or histogram" in bad.output
    scans.write_text("\n")
    args = ["pretrain", archive, "--config", "vit-micro", "--out", tmp_path / "y", "--scans", scans, "--quiet"]
    bad = runner.invoke(app, [str(a) for a in args])
    assert bad.exit_code == 2 and "lists no scan ids" in bad.output
    scans.write_text("no-such-scan\n")
    args = ["pretrain", archive, "--config", "vit-micro", "--out", tmp_path / "y", "--scans", scans, "--quiet"]
    bad = runner.invoke(app, [str(a) for a in args])
    assert bad.exit_code != 0 and "not usable" in bad.output and "no-such-scan" in bad.output
