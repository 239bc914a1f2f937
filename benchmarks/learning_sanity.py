"""A sanity set where the signal dominates: can each pretraining objective beat random initialisation at all?

Small CT-like volumes each hold one class of six (sphere, cube, torus, cylinder, cone, hollow shell): one object at
a random pose, size and place (v1-v3), or (v4) the field filled with many small objects of the class, each at its
own rotation, size and place, covering a fraction of the field drawn from one range for every class. CT number and
noise level are drawn per volume. Written as NIfTI files in Hounsfield units (air around the objects) and read by
the same archive, preprocessing and cached-view machinery as head CT. Each objective (DINO, MAE,
SimCLR) pretrains vit-micro briefly on the training part, without labels; then the frozen CLS vectors of the
held-out part are classified by cosine kNN (k = 10) against the training part's, beside a random-initialised
encoder of the same seed. Reported: kNN accuracy with a bootstrap 95 % CI (over test volumes) and a two-sided
paired permutation P value against random init (on per-volume correctness).

If an objective cannot beat random init here, its machinery is broken; if it can, a head-CT result is about the
task. Settings are fixed below before any run; nothing is tuned on the test part.

    .venv/bin/python benchmarks/learning_sanity.py --out bench-out/sanity                      # ~1 h training, 1 thread
    .venv/bin/python benchmarks/learning_sanity.py --out /tmp/s --budget quick                 # ~1 min smoke run
    .venv/bin/python benchmarks/learning_sanity.py --out bench-out/sanity --variant v6         # SimCLR alone, v4's set
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("learning_sanity")

CLASSES = ("sphere", "cube", "torus", "cylinder", "cone", "shell")
METHODS = ("dino", "mae", "simclr")
BUDGETS = {
    "full": {"per_class": 60, "grid": 64, "epochs": 24},
    "quick": {"per_class": 6, "grid": 32, "epochs": 1},
}
# settings fixed before each run. v1: CT numbers over the whole brain window (a per-volume cue two views share, so
# matching views needs no shape) and short runs. v2: CT numbers and noise within what the views' own intensity
# changes cover, longer runs, DINO's teacher held at 0.04 with per-parameter clipping, MAE on per-patch
# normalised targets (the shape's edges, not the air around it)
# v3 (after v1 and v2 found no objective above random init): every nuisance within what the views teach the encoder
# to ignore. Poses within +-20 deg of upright (the views turn by +-15 deg: a random 3D rotation is a nuisance no view
# covers, so two cubes at different poses stay unlike to any encoder), objects 1.0-1.4x so that DINO's crops and
# MAE's patches fall on the object rather than air, offsets +-10 mm, and SimCLR's views with their own intensity
# shift and contrast (v1's SimCLR matched views by CT number)
# v4 (after v3, whose DINO teacher again went uniform and whose SimCLR again fell below random init): the signal in
# every view. In v1-v3 one object covered 5-15 % of the field, so most of DINO's local crops and most of MAE's
# masked patches held only air: nothing about the volume can be predicted from them, the best a student can do
# there is the average target (the centred teacher's flat one), and MAE learns to paint air. Here the field is
# filled with small objects of the class (any rotation each, 0.4-0.55x, cut at the field's edge), covering 6-12 % of
# it, the same range for every class: nearly every crop holds the class (and ~half or more of MAE's patches), while
# how much is object and its CT number say nothing of it. 100 volumes a class (200 held out: a gain of ~8 points,
# like MAE's in v3, then reaches P < 0.01), 96^3 at 2 mm (the base volume's spacing), 29 epochs (about v3's steps
# on 400 volumes). SimCLR's two views each their own random cube (96-192 mm edge) before the deformation, akin to
# SimCLR's random resized crop: two deformed copies of the whole volume share where every object lies, which matches
# them without any shape. Other training settings as v3. Before the run, on the training part alone: random init's
# 5-fold kNN accuracy 0.355 (chance 0.167), so the set leaves room above random features
VARIANTS = {
    "v1": {"hu": (15.0, 75.0), "noise": (2.0, 12.0), "epochs_factor": 1.0, "dino_lr": 1e-4, "teacher_temp": None,
           "clip_mode": "global", "norm_pix_loss": False},
    "v2": {"hu": (35.0, 50.0), "noise": (2.0, 5.0), "epochs_factor": 2.0, "dino_lr": 3e-4, "teacher_temp": 0.04,
           "clip_mode": "per-parameter", "norm_pix_loss": True},
    "v3": {"hu": (35.0, 50.0), "noise": (2.0, 5.0), "epochs_factor": 2.0, "dino_lr": 3e-4, "teacher_temp": 0.04,
           "clip_mode": "per-parameter", "norm_pix_loss": True, "pose_deg": 20.0, "size": (1.0, 1.4),
           "offset_mm": 10.0, "pair_intensity_jitter": True},
    "v4": {"hu": (35.0, 50.0), "noise": (2.0, 5.0), "epochs_factor": 1.2, "dino_lr": 3e-4, "teacher_temp": 0.04,
           "clip_mode": "per-parameter", "norm_pix_loss": True, "pair_intensity_jitter": True,
           "filled": {"fill": (0.06, 0.12), "size": (0.4, 0.55)}, "per_class": 100, "grid": 96,
           "pair_crop_mm": (96.0, 192.0)},
}  # fmt: skip
# v5 (after v4's DINO teacher went uniform again by step ~400 with the class in every view; fixed before its run):
# v4's set, split and settings with the teacher temperature held at 0.02, the DINO authors' advice when the teacher
# collapses on data other than ImageNet (more sharpening: facebookresearch/dino issue 43). DINO only: the other
# objectives' runs are v4's
VARIANTS["v5"] = {**VARIANTS["v4"], "teacher_temp": 0.02, "set": "v4", "methods": ("dino",)}
# v6 (after v4, fixed before its run): v4's set, split and settings with SimCLR's two views deformed copies of the whole
# volume (no cube), to tell what the set did for SimCLR from what its new views did. SimCLR only
VARIANTS["v6"] = {**VARIANTS["v4"], "pair_crop_mm": None, "set": "v4", "methods": ("simclr",)}
POSE = {"pose_deg": None, "size": (0.7, 1.2), "offset_mm": 15.0}  # v1 and v2: any rotation
FIELD_MM = 192.0  # the volume's field of view (the model input's 192 mm centre crop)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _small_rotation(rng: np.random.Generator, *, degrees: float) -> np.ndarray:
    """A rotation by U(-degrees, degrees) about each axis in turn."""
    out = np.eye(3)
    for axis, a in enumerate(np.radians(rng.uniform(-degrees, degrees, size=3))):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = r @ out
    return out


def _inside(kind: str, p: np.ndarray, s: float) -> np.ndarray:
    """``p [..., 3]`` points in the object's own frame (mm) -> bool: inside an object of class ``kind`` and size
    factor ``s``."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if kind == "sphere":
        return np.sqrt(x**2 + y**2 + z**2) <= 45 * s
    if kind == "cube":
        return np.max(np.abs(p), axis=-1) <= 35 * s
    if kind == "torus":
        return (np.sqrt(x**2 + y**2) - 45 * s) ** 2 + z**2 <= (15 * s) ** 2
    if kind == "cylinder":
        return (np.sqrt(x**2 + y**2) <= 22 * s) & (np.abs(z) <= 55 * s)
    if kind == "cone":  # apex at z = +55 s, base radius 40 s at z = -55 s
        t = (55 * s - z) / (110 * s)
        return (t >= 0) & (t <= 1) & (np.sqrt(x**2 + y**2) <= 40 * s * t)
    if kind == "shell":
        r = np.sqrt(x**2 + y**2 + z**2)
        return (r <= 55 * s) & (r >= 55 * s - 10)
    raise ValueError(kind)


REACH = 70.0  # mm per unit size factor: every class's object lies within this distance of its centre


def _grid_mm(grid: int) -> np.ndarray:
    """Voxel centres of a ``[grid]³`` ``FIELD_MM`` cube, mm from its centre."""
    return (np.arange(grid) + 0.5) * FIELD_MM / grid - FIELD_MM / 2


def object_mask(
    kind: str, *, grid: int, rng: np.random.Generator, pose_deg: float | None = None,
    size: tuple[float, float] = (0.7, 1.2), offset_mm: float = 15.0,
) -> np.ndarray:  # fmt: skip
    """``[grid]³`` bool: one object of class ``kind`` at a random pose (any rotation, or within ``pose_deg`` of
    upright), size factor and offset, in a ``FIELD_MM`` cube."""
    mm = _grid_mm(grid)
    p = np.stack(np.meshgrid(mm, mm, mm, indexing="ij"), axis=-1)  # [Z, Y, X, 3] in mm
    offset = rng.uniform(-offset_mm, offset_mm, size=3)
    turn = _rotation(rng) if pose_deg is None else _small_rotation(rng, degrees=pose_deg)
    p = (p - offset) @ turn  # object frame
    return _inside(kind, p, rng.uniform(*size))


def filled_mask(
    kind: str, *, grid: int, rng: np.random.Generator, fill: tuple[float, float], size: tuple[float, float]
) -> np.ndarray:
    """``[grid]³`` bool: the field filled with small objects of class ``kind``, each at its own uniformly random
    rotation, size factor and place (cut where it crosses the field's edge), added until they cover a fraction of
    the field drawn from ``fill``: the same range for every class, so how much of the field is object says nothing
    of the class. Objects may overlap where they fall on one another."""
    mm = _grid_mm(grid)
    step = FIELD_MM / grid
    mask = np.zeros((grid,) * 3, bool)
    target, covered = rng.uniform(*fill) * mask.size, 0
    while covered < target:
        s = rng.uniform(*size)
        reach = REACH * s
        centre = rng.uniform(-FIELD_MM / 2, FIELD_MM / 2, size=3)
        turn = _rotation(rng)
        lo = np.clip(np.floor((centre - reach + FIELD_MM / 2) / step).astype(int), 0, grid)
        hi = np.clip(np.ceil((centre + reach + FIELD_MM / 2) / step).astype(int) + 1, 0, grid)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        p = np.stack(np.meshgrid(*(mm[b] for b in box), indexing="ij"), axis=-1)
        inside = _inside(kind, (p - centre) @ turn, s)
        covered += int((inside & ~mask[box]).sum())
        mask[box] |= inside
    return mask


def make_set(
    folder: Path,
    *,
    per_class: int,
    grid: int,
    seed: int,
    hu: tuple[float, float],
    noise: tuple[float, float],
    pose: dict | None = None,
    filled: dict | None = None,
) -> list[tuple[str, str]]:
    """Write ``per_class`` NIfTI volumes of every class (HU, RAS affine); returns (file stem, class) pairs.

    One object per volume (``pose``: its rotation, size and offset ranges), or with ``filled`` (``fill`` and
    ``size`` ranges) the field filled with separate small objects of the class (:func:`filled_mask`), each volume
    then drawn from its own seed (a volume already written changes no other)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spacing = FIELD_MM / grid
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -FIELD_MM / 2
    rows = []
    for i in range(per_class):
        for c, kind in enumerate(CLASSES):
            stem = f"{kind}_{i:03d}"
            path = folder / f"{stem}.nii.gz"
            if not path.exists():
                if filled is not None:
                    rng = np.random.default_rng([seed, i, c])
                    mask = filled_mask(kind, grid=grid, rng=rng, **filled)
                else:
                    mask = object_mask(kind, grid=grid, rng=rng, **(pose or POSE))
                volume = np.full((grid,) * 3, -1000.0, np.float32)
                volume[mask] = rng.uniform(*hu)  # within the brain and subdural windows
                volume += rng.normal(0, rng.uniform(*noise), size=volume.shape).astype(np.float32)
                # NIfTI axes i, j, k = x, y, z: the array is [Z, Y, X]
                nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine), path)
            rows.append((stem, kind))
    return rows


def folders(args, method: str | None = None) -> Path:
    """The variant's volume folder (``method`` None) or one objective's run folder; a quick budget's apart from the
    full one's (``make_set`` keeps volumes already written, so the two must not share a folder)."""
    variant = VARIANTS[args.variant]
    quick = _budget_suffix(args)
    if method is None:
        name = "volumes" if args.variant == "v1" else f"volumes_{variant.get('set', args.variant)}"
    else:
        name = f"{method}_{args.input_norm}" if args.variant == "v1" else f"{method}_{args.variant}"
    return args.out / f"{name}{quick}"


def summary_path(args) -> Path:
    """The run's JSON summary; a quick budget's apart from the full one's, which it must not overwrite."""
    name = f"summary_{args.input_norm}" if args.variant == "v1" else f"summary_{args.variant}_{args.input_norm}"
    return args.out / f"{name}{_budget_suffix(args)}.json"


def _budget_suffix(args) -> str:
    return "" if args.budget == "full" else f"_{args.budget}"


def pretrain(args, method: str, *, train_ids: list[str]) -> Path:
    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.mae import MAEConfig
    from hctembed.workflows.pretrain import pretrain_archive

    # fixed before the run: batch 8 (SimCLR 16), lr 1e-4 (DINO) / 3e-4, 1 warm-up epoch, 2 + 2 DINO crops,
    # 4,096 prototypes and the BN head, a light MAE decoder (96 x 2)
    v = VARIANTS[args.variant]
    temps = {} if v["teacher_temp"] is None else {"warmup_teacher_temp": v["teacher_temp"],
                                                   "teacher_temp": v["teacher_temp"]}  # fmt: skip
    config = PretrainConfig(
        method=method, model="vit-micro", epochs=args.epochs, batch_size=16 if method == "simclr" else 8,
        lr={"dino": v["dino_lr"], "mae": 3e-4, "simclr": 3e-4}[method], warmup_epochs=1.0, local_crops=2,
        prototypes=4096, head_bn=method == "dino", teacher_temp_warmup_epochs=max(1.0, args.epochs * 0.3),
        checkpoint_every=100, monitor_every=10**6, input_norm=args.input_norm, seed=args.seed,
        clip_mode=v["clip_mode"] if method == "dino" else "global",
        pair_intensity_jitter=method == "simclr" and v.get("pair_intensity_jitter", False),
        pair_crop_mm=v.get("pair_crop_mm") if method == "simclr" else None,
        mae=MAEConfig(decoder_dim=96, decoder_depth=2, decoder_heads=4, norm_pix_loss=v["norm_pix_loss"]), **temps,
    )  # fmt: skip
    result = pretrain_archive(folders(args), config=config, out=folders(args, method), cache_dir=args.out / "cache",
                              device="cpu", resume=True, scan_ids=train_ids)  # fmt: skip
    return result.encoder_path


@torch.no_grad()
def cls_vectors(model, paths: list[Path]) -> np.ndarray:
    """``[N, D]`` L2-normalised CLS vectors of the embedding-time input of each cached base volume."""
    from hctembed.augment import input_from_base
    from hctembed.pretrain.cache import read_base

    model.eval()
    size = model.config.image_size
    out = []
    for i in range(0, len(paths), 16):
        x = torch.stack([input_from_base(read_base(p), image_size=size) for p in paths[i : i + 16]])
        out.append(torch.nn.functional.normalize(model.forward_features(x)[:, 0].float(), dim=-1))
    return torch.cat(out).numpy()


def knn_correct(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per test volume: 1.0 when the cosine kNN (k = 10, temperature-weighted) vote names its class."""
    from hctembed.eval.classification import knn_proba

    classes, proba = knn_proba(x[train], y[train], x[test], k=10)
    return (classes[proba.argmax(1)] == y[test]).astype(np.float64)


def draw(path: Path, *, volumes: Path, rows: list[tuple[str, str]], results: dict, title: str) -> None:
    """One middle slice of a volume of each class (brain window) above each encoder's kNN accuracy with its CI."""
    import matplotlib
    import nibabel as nib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5.6))
    grid = fig.add_gridspec(2, len(CLASSES), height_ratios=(1, 1.25))
    first = {}
    for stem, kind in rows:
        first.setdefault(kind, stem)
    for c, kind in enumerate(CLASSES):
        ax = fig.add_subplot(grid[0, c])
        hu = np.asarray(nib.load(volumes / f"{first[kind]}.nii.gz").dataobj)  # [X, Y, Z]
        ax.imshow(np.clip(hu[:, :, hu.shape[2] // 2].T / 80.0, 0, 1), cmap="gray", origin="lower")  # 0-80 HU
        ax.set_title(kind)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    names = list(results)
    values = [results[n]["accuracy"]["value"] for n in names]
    err = [[v - results[n]["accuracy"]["low"] for n, v in zip(names, values, strict=True)],
           [results[n]["accuracy"]["high"] - v for n, v in zip(names, values, strict=True)]]  # fmt: skip
    ax.barh(names, values, xerr=err, color=[f"C{i}" for i in range(len(names))], capsize=4)
    for i, n in enumerate(names):
        p = results[n]["p_vs_random"]
        ax.annotate(f"{values[i]:.3f}" + ("" if p is None else f"  (P {p:.4f})"), (values[i], i),
                    xytext=(8, -12), textcoords="offset points", fontsize=9)  # fmt: skip
    ax.axvline(1 / len(CLASSES), color="grey", linestyle="--", label="chance")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("frozen CLS kNN accuracy on held-out volumes (95 % bootstrap CI)")
    ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_seconds(run: Path) -> float | None:
    """The wall seconds a run's own log gives for its last step (not the time a later call took to resume it)."""
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").exists() else []
    return json.loads(lines[-1]).get("seconds") if lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--methods", default=None, help="comma-separated; default: the variant's own (all three)")
    parser.add_argument("--input-norm", choices=("none", "standardise"), default="standardise")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="v4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw the classes and the accuracies as a PNG here")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    budget = BUDGETS[args.budget]
    variant = VARIANTS[args.variant]
    args.epochs = round(budget["epochs"] * variant["epochs_factor"])
    methods = args.methods.split(",") if args.methods else list(variant.get("methods", METHODS))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    from hctembed.augment import base_preprocess
    from hctembed.config import VIT_PRESETS
    from hctembed.eval.stats import bootstrap_mean, paired_permutation_test
    from hctembed.io.archive import scan_archive
    from hctembed.model.checkpoint import load_encoder_weights
    from hctembed.model.vit3d import ViT3D
    from hctembed.pretrain.cache import build_cache
    from hctembed.pretrain.loop import fit_input_stats

    volumes = folders(args)
    pose = {k: variant.get(k, POSE[k]) for k in POSE}
    full = args.budget == "full"  # a variant's own set size applies to the full budget; quick stays quick
    rows = make_set(volumes, per_class=variant.get("per_class", budget["per_class"]) if full else budget["per_class"],
                    grid=variant.get("grid", budget["grid"]) if full else budget["grid"], seed=args.seed,
                    hu=variant["hu"], noise=variant["noise"], pose=pose, filled=variant.get("filled"))  # fmt: skip
    kind_of = dict(rows)
    refs = scan_archive(volumes).selected
    by_stem = {r.scan_id: r for r in refs}
    stems = sorted(kind_of)
    refs = [by_stem[s] for s in stems]
    y = np.array([kind_of[s] for s in stems])
    index = np.random.default_rng(args.seed).permutation(len(stems))
    n_test = len(stems) // 3
    test, train = np.sort(index[:n_test]), np.sort(index[n_test:])
    scans, failed = build_cache(refs, folder=args.out / "cache",
                                config=base_preprocess(image_size=VIT_PRESETS["vit-micro"].image_size))  # fmt: skip
    if failed:
        raise SystemExit(f"{len(failed)} volumes failed preprocessing, e.g. {failed[0]}")
    paths = [s.path for s in scans]

    # random init with the same input handling as the pretrained encoders (standardised by the training part's
    # statistics, as pretraining fits them)
    torch.manual_seed(args.seed)
    random_init = ViT3D(replace(VIT_PRESETS["vit-micro"], input_norm=args.input_norm))
    if args.input_norm == "standardise":
        train_scans = [scans[i] for i in train]
        random_init.set_input_stats(**fit_input_stats(train_scans, image_size=random_init.config.image_size))
    vectors = {"random init": cls_vectors(random_init, paths)}  # [N, D] each, every volume embedded once
    # how much room the set leaves above random features, from the training part alone: 5-fold kNN of random init
    x_train, y_train = vectors["random init"][train], y[train]
    fold = np.arange(train.size) % 5
    headroom = float(np.mean([knn_correct(x_train, y_train, np.flatnonzero(fold != f), np.flatnonzero(fold == f)).mean()
                              for f in range(5)]))  # fmt: skip
    log.info("random init, 5-fold kNN accuracy within the training part: %.3f", headroom)
    seconds = {}
    for method in methods:
        path = pretrain(args, method, train_ids=[refs[i].scan_id for i in train])
        seconds[method] = training_seconds(path.parent)
        vectors[method] = cls_vectors(load_encoder_weights(path)[0], paths)
    correct = {name: knn_correct(x, y, train, test) for name, x in vectors.items()}
    base = correct["random init"]
    results = {}
    print(f"| encoder ({args.variant}, {args.input_norm} inputs) | kNN accuracy [95 % CI] | P vs random init | "
          "training wall s (its log) |")  # fmt: skip
    print("|---|---|---|---|")
    for name, c in correct.items():
        est = bootstrap_mean(c, n_resamples=1000, seed=args.seed)
        p = None if name == "random init" else paired_permutation_test(c, base, n_permutations=10000, seed=0).p_value
        results[name] = {"accuracy": est.to_dict(), "p_vs_random": p, "seconds": seconds.get(name)}
        p_text = "" if p is None else f"{p:.4f}"
        print(f"| {name} | {est.value:.3f} [{est.low:.3f}, {est.high:.3f}] | {p_text} | {seconds.get(name, '')} |")
    summary = {"budget": args.budget, "variant": args.variant, "settings": variant, "input_norm": args.input_norm,
               "n_train": int(train.size), "n_test": int(test.size), "chance": 1 / len(CLASSES),
               "random_init_train_cv": headroom, "results": results}  # fmt: skip
    summary_path(args).write_text(json.dumps(summary, indent=2))
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        draw(args.figure, volumes=volumes, rows=rows, results=results,
             title=f"Sanity set {args.variant}: frozen vit-micro after brief pretraining, against random init "
                   f"({test.size} held-out volumes)")  # fmt: skip


if __name__ == "__main__":
    main()
