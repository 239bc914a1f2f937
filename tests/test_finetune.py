"""Fine-tuning: starts from exactly the given weights, separate learning rates, learns a separable task, resumes
exactly, and runs from the command line into an encoder that `embed --weights` uses; bench finetune/fewshot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.config import ViTConfig
from hctembed.errors import HctembedError
from hctembed.eval.classification import roc_auc
from hctembed.finetune import FinetuneConfig, predict, train_classifier
from hctembed.finetune.classifier import build_classifier
from hctembed.model.checkpoint import save_encoder
from hctembed.model.vit3d import ViT3D

# 48³ input (vit-micro's preprocessing) with 27 patches of 16³: fast on a CPU
TINY = ViTConfig(name="tiny48", image_size=48, patch_size=16, dim=48, depth=1, heads=2, mlp_dim=96)


def tiny_weights(path, seed=0):
    torch.manual_seed(seed)
    save_encoder(ViT3D(TINY), path, card={"source": "test"})
    return path


def separable(tmp_path, n=24, size=112):
    """Cached base volumes (uint8 [3, S, S, S], the 224 mm base of a 48³ model): positives carry a bright cube."""
    rng = np.random.default_rng(0)
    paths, y = [], []
    for i in range(n):
        v = (rng.random((3, size, size, size)) * 60).astype(np.uint8)
        if i % 2:
            v[:, 40:72, 40:72, 40:72] += 150
        path = tmp_path / f"s{i}.npy"
        np.save(path, v)
        paths.append(path)
        y.append([i % 2])
    return paths, np.asarray(y, np.float32)


FAST = FinetuneConfig(model="vit-micro", epochs=2, batch_size=4, samples_per_epoch=16, lr_backbone=1e-4,
                      lr_head=1e-2, checkpoint_every=4)  # fmt: skip


def test_starts_from_exactly_the_weight_file_and_refuses_a_wrong_one(tmp_path):
    weights = tiny_weights(tmp_path / "w.safetensors")
    model, init = build_classifier(model="vit-micro", weights=weights, n_tasks=2, seed=0)
    stored = load_file(str(weights))
    for key, value in model.backbone.state_dict().items():
        if key in stored:
            assert torch.equal(value, stored[key]), key
    assert set(stored) <= set(model.backbone.state_dict())
    assert init["init"] == "weights" and len(init["weights_digest"]) == 64
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(HctembedError):
        build_classifier(model="vit-micro", weights=bad, n_tasks=1, seed=0)


@pytest.mark.parametrize("pool", ["cls", "attentive"])
def test_head_and_backbone_learn_at_their_own_rates(tmp_path, pool):
    paths, y = separable(tmp_path, n=8)
    weights = tiny_weights(tmp_path / "w.safetensors")
    frozen = FinetuneConfig(model="vit-micro", epochs=1, batch_size=4, samples_per_epoch=8, lr_backbone=0.0,
                            lr_head=1e-2, weight_decay=0.0, pool=pool)  # fmt: skip
    before, _ = build_classifier(model="vit-micro", weights=weights, n_tasks=1, seed=0, pool=pool)
    result = train_classifier(paths=paths, y=y, train=np.arange(8), config=frozen, weights=weights, out=tmp_path / "r")
    after = result.classifier
    for (name, a), b in zip(before.backbone.state_dict().items(), after.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"backbone {name} moved with lr 0"
    assert not torch.equal(before.head.weight, after.head.weight)
    if pool == "attentive":  # the attention pooling is part of the head: it learns at the head's rate
        assert not torch.equal(before.attend.query, after.attend.query)
        assert not torch.equal(before.attend.attn.in_proj_weight, after.attend.attn.in_proj_weight)
    else:
        assert after.attend is None
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["lr_backbone"] == 0.0 and rows[0]["lr_head"] == pytest.approx(1e-2)
    assert (tmp_path / "r" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("pool", ["cls", "attentive"])
def test_a_tiny_model_learns_a_trivially_separable_task(tmp_path, pool):
    paths, y = separable(tmp_path)
    weights = tiny_weights(tmp_path / "w.safetensors")
    config = FinetuneConfig(model="vit-micro", epochs=3, batch_size=4, samples_per_epoch=40, lr_backbone=1e-4,
                            lr_head=1e-2, pool=pool)  # fmt: skip
    result = train_classifier(paths=paths, y=y, train=np.arange(16), config=config, weights=weights)
    scores = predict(result.classifier, paths[16:])[:, 0]
    assert roc_auc(y[16:, 0], scores) == 1.0


def test_resume_after_a_stop_is_exact(tmp_path):
    paths, y = separable(tmp_path, n=12)
    weights = tiny_weights(tmp_path / "w.safetensors")
    straight = train_classifier(paths=paths, y=y, train=np.arange(12), config=FAST, weights=weights,
                                out=tmp_path / "a")  # fmt: skip
    stopped = FinetuneConfig(**{**FAST.__dict__, "max_steps": 4})
    train_classifier(paths=paths, y=y, train=np.arange(12), config=stopped, weights=weights, out=tmp_path / "b")
    resumed = train_classifier(paths=paths, y=y, train=np.arange(12), config=FAST, weights=weights,
                               out=tmp_path / "b", resume=True)  # fmt: skip
    assert resumed.steps_done == straight.steps_done == 8
    for (name, a), b in zip(straight.classifier.state_dict().items(), resumed.classifier.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    other = FinetuneConfig(**{**FAST.__dict__, "lr_head": 0.5})
    with pytest.raises(HctembedError, match="other settings"):
        train_classifier(paths=paths, y=y, train=np.arange(12), config=other, weights=weights, out=tmp_path / "b",
                         resume=True)  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from hctembed.synth import SynthConfig, generate_archive

    root = tmp_path_factory.mktemp("ft") / "archive"
    generate_archive(root, n=30, seed=5, config=SynthConfig(matrix=48))
    return root


def busiest(archive, n=2) -> list[str]:
    """The ``n`` subtypes closest to half positive in the archive."""
    import csv

    from hctembed.synth.lesions import SUBTYPES

    with open(archive / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    return sorted(SUBTYPES, key=lambda c: abs(sum(r[c] == "1" for r in rows) - len(rows) / 2))[:n]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_finetune_command_writes_results_and_an_encoder_embed_can_use(archive, tmp_path):
    weights = tiny_weights(tmp_path / "w.safetensors")
    out = tmp_path / "run"
    t1, t2 = busiest(archive)
    result = invoke("finetune", archive, "--labels", archive / "labels.csv", "--task", t1, "--task", t2,
                    "--weights", weights, "--out", out, "--epochs", "1", "--samples-per-epoch", "8", "--batch-size",
                    "4", "--ratios", "0.6,0.2,0.2", "--cache", tmp_path / "cache", "--pool", "attentive", "--json",
                    "--warmup-fraction", "0.25", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["task"] for r in rows] == [t1, t2]
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["lr_backbone"] == 1e-5 and saved["split"]["ratios"] == [0.6, 0.2, 0.2]
    assert saved["settings"]["warmup_fraction"] == 0.25
    trained = [r["task"] for r in saved["rows"] if not r.get("skip_reason")]
    assert trained, saved["rows"]
    for task in trained:
        assert (out / task / "encoder.safetensors").exists() and (out / task / "head.safetensors").exists()
    head = load_file(str(out / trained[0] / "head.safetensors"))
    assert {"head.weight", "head.bias", "norm.running_mean", "norm.running_var", "attend.query"} <= set(head)
    with safe_open(str(out / trained[0] / "head.safetensors"), "pt") as f:
        assert f.metadata()["pool"] == "attentive"
    db = tmp_path / "h.duckdb"
    embedded = invoke("embed", archive, "--db", db, "--model", "vit-micro", "--weights",
                      out / trained[0] / "encoder.safetensors", "--workers", "0", "--json", "--quiet")  # fmt: skip
    assert embedded.exit_code == 0, embedded.output
    assert json.loads(embedded.stdout.strip().splitlines()[-1])["embedded"] == 30
    # neither a weight file nor --scratch; a missing weight file: one line, exit 2
    assert invoke("finetune", archive, "--labels", archive / "labels.csv", "--task", "SDH", "--out", out).exit_code == 2
    missing = invoke("finetune", archive, "--labels", archive / "labels.csv", "--task", "SDH", "--out", out,
                     "--weights", tmp_path / "nope.safetensors")  # fmt: skip
    assert missing.exit_code == 2 and "not found" in missing.output and "Traceback" not in missing.output


def test_bench_finetune_and_fewshot_finetune_compare_models(archive, tmp_path):
    a, b = tiny_weights(tmp_path / "a.safetensors", 0), tiny_weights(tmp_path / "b.safetensors", 1)
    common = ["--archive", archive, "--labels", archive / "labels.csv", "--columns", ",".join(busiest(archive)),
              "--weights", a, "--weights", b, "--no-scratch", "--epochs", "1", "--samples-per-epoch", "8",
              "--batch-size", "4", "--ratios", "0.6,0.0,0.4", "--n-resamples", "10", "--n-permutations", "50",
              "--json", "--quiet"]  # fmt: skip
    out = tmp_path / "bench"
    result = invoke("bench", "finetune", *common, "--out-dir", out, "--warmup-fraction", "0.1")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"] == "finetune" and saved["models"] == ["a", "b"] and saved["params"]["pool"] == "cls"
    assert saved["params"]["warmup_fraction"] == 0.1
    assert {p.name for p in out.glob("*.png")} == {"auc_per_task.png", "ap_per_task.png"}
    evaluated = [r for r in saved["rows"] if r["model"] == "b" and r["metrics"]]
    assert evaluated and all(0.0 <= r["p_values"]["AUC"] <= 1.0 for r in evaluated)
    few = tmp_path / "few"
    result = invoke("bench", "fewshot", "--finetune", *common, "--ks", "2", "--draws", "2", "--pool", "attentive",
                    "--out-dir", few)  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((few / "results.json").read_text())
    assert saved["probe"] == "finetune" and saved["params"]["pool"] == "attentive"
    mean_b = next(c for c in saved["curves"] if c["task"] == "mean" and c["model"] == "b")["points"][0]
    per_task = [c["points"][0]["AUC"]["value"] for c in saved["curves"]
                if c["model"] == "b" and c["task"] in mean_b["tasks"]]  # fmt: skip
    assert mean_b["AUC"]["value"] == pytest.approx(np.mean(per_task))
    assert 0.0 <= mean_b["p_values"]["AUC"] <= 1.0


def _ddp_worker(rank: int, world: int, rendezvous: str, paths, y, weights: str, out: str, config) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = train_classifier(paths=paths, y=y, train=np.arange(len(paths)), config=config, weights=Path(weights),
                                  out=Path(out))  # fmt: skip
        torch.save(result.classifier.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_agree_and_match_one_process(tmp_path):
    """Two processes with 2 scans each per step = one process with 4 (batch-standardisation off: it sees each
    process's own batch)."""
    import torch.multiprocessing as mp

    paths, y = separable(tmp_path, n=8)
    weights = tiny_weights(tmp_path / "w.safetensors")
    config = FinetuneConfig(model="vit-micro", epochs=1, batch_size=2, samples_per_epoch=12, lr_backbone=1e-4,
                            lr_head=1e-2, head_norm=False)  # fmt: skip
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdv"), paths, y, str(weights), str(out), config), nprocs=2,
             join=True)  # fmt: skip
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    single = train_classifier(paths=paths, y=y, train=np.arange(8), config=FinetuneConfig(**{**config.__dict__,
                              "batch_size": 4}), weights=weights)  # fmt: skip
    s = single.classifier.state_dict()
    for key in r0:
        torch.testing.assert_close(r0[key], s[key], rtol=1e-3, atol=1e-4, msg=key)
    initial, _ = build_classifier(model="vit-micro", weights=weights, n_tasks=1, seed=0, head_norm=False)
    assert not torch.equal(initial.head.weight, r0["head.weight"])
    rows = (out / "log.jsonl").read_text().splitlines()
    assert len(rows) == 3 and (out / "checkpoint.pt").exists()  # 12 samples / (2 x 2) = 3 steps, by rank 0
