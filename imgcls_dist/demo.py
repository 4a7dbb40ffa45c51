"""`make demo`: the whole workflow on the built-in digits, end to end, on whatever machine this is."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from imgcls_dist.config import SHIPPED_CONFIGS, load_config
from imgcls_dist.data.schema import DATASET_FILE

DEMO_MODELS = ("resnet18_digits", "lenet5_digits")
# 30% test split (540 rows) instead of ingest's 15% (270): at ~99.5% accuracy one image is 0.37 points of a
# 270-row split, too coarse to compare an ensemble with its members.
DEMO_SPLITS = (0.6, 0.1, 0.3)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(workdir: Path, quick: bool = False) -> dict:
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.models.registry import models_table
    from imgcls_dist.train.job import run_training

    t0 = time.perf_counter()
    workdir = workdir.resolve()
    data = workdir / "data" / "digits-test30"
    _banner("1/4 ingest builtin:digits")
    if (data / DATASET_FILE).exists():
        print(f"using existing dataset {data}")
    else:
        meta = ingest("builtin:digits", data, image_size=32, fractions=DEMO_SPLITS)
        print(f"{sum(meta['counts'].values())} images -> {data} {meta['counts']}")

    _banner("registry (named architectures)")
    print(models_table(named_only=True))

    runs = {}
    for name in DEMO_MODELS:
        _banner(f"2/4 train {name}")
        overrides = [f"data.path={data}", f"run.storage_path={workdir / 'runs'}"]
        if quick:
            overrides += ["train.epochs=2", "train.warmup_epochs=0", "data.max_train_samples=256"]
        cfg = load_config(SHIPPED_CONFIGS / f"{name}.yaml", overrides)
        previous = workdir / "runs" / cfg.run.name
        if previous.exists():  # Ray Train would resume a finished run of the same name instead of training
            print(f"removing the previous demo run {previous}")
            shutil.rmtree(previous)
        runs[name] = run_training(cfg)

    summary = {"runs": {k: {"run_dir": v["run_dir"], "test_acc": v.get("test_acc")} for k, v in runs.items()}}
    summary.update(_infer_and_evaluate(workdir, data, runs, quick))
    _banner(f"done in {time.perf_counter() - t0:.0f}s")
    for name, r in runs.items():
        print(f"{name}: test acc {r.get('test_acc', float('nan')):.4f}  report {r['run_dir']}/classification_report.txt"
              f"  curves {r['run_dir']}/training_history.png")
    return summary


def _infer_and_evaluate(workdir: Path, data: Path, runs: dict, quick: bool) -> dict:
    from imgcls_dist.ensemble.build import build_ensemble
    from imgcls_dist.evaluate.report import evaluate_predictions
    from imgcls_dist.batch.pipeline import run_batch_inference

    preds = workdir / "predictions"
    test = data / "test"
    sets: dict[str, str] = {}
    _banner("3/4 batch inference on the test split (Ray Data)")
    for name, r in runs.items():  # each member alone, no TTA: the baseline the ensemble must match
        out = preds / f"{name}_plain"
        run_batch_inference([r["model"]], test, out, tta="none")
        sets[f"{name} (no TTA)"] = str(out)
    mean = preds / "mean_tta"
    # The plain mean with the default TTA views (the views every model saw in training) ...
    run_batch_inference([r["model"] for r in runs.values()], test, mean, tta=None, combine="mean")
    sets["plain mean + TTA"] = str(mean)
    # ... against the ensemble built on the validation split: temperatures, weights and views fitted there.
    manifest_path = workdir / "ensemble" / "ensemble.json"
    manifest = build_ensemble([r["model"] for r in runs.values()], data, manifest_path)
    ens = preds / "ensemble_built"
    run_batch_inference(manifest_path, test, ens)
    _banner("4/4 evaluate")
    report = evaluate_predictions(ens, classes_file=data / DATASET_FILE, compare=sets, report_dir=workdir / "report",
                                  name="built ensemble")
    print(f"report: {workdir / 'report'} (classification_report.txt, confusion_matrix.png, comparison.csv, "
          f"reliability.png); ensemble: {manifest_path} ({len(manifest['models'])} member(s), views "
          f"{','.join(manifest['views'])})")
    return {"predictions": str(ens), "report_dir": str(workdir / "report"), "evaluation": report}
