"""`python -m benchmarks ensemble`: the ensemble built on validation data against its members and the plain mean.

For each training seed, the shipped configs are trained on the same dataset (`train.seed` = the seed), an
ensemble is built from them on the validation split (`ensemble build`), and every candidate is scored on
the test split — which nothing was fitted on — by test accuracy and NLL: each member alone (no TTA), also
with the temperature the builder fitted for it (`test_nll_T`: how much of the built ensemble's gain is
calibration alone), the plain mean of all members (no TTA, temperature 1), and the built ensemble (its
weights, temperatures and views). Goals: built accuracy >= the best member's for every seed, and
NLL below the best member's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import machine, print_table
from imgcls_dist.config import SHIPPED_CONFIGS, load_config
from imgcls_dist.data.schema import split_files
from imgcls_dist.ensemble.build import build_ensemble, collect_logits
from imgcls_dist.ensemble.calibrate import softmax
from imgcls_dist.ensemble.select import accuracy, log_loss
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import labelled_batches

CONFIGS = ("resnet18_digits", "lenet5_digits", "efficientnet_b0_digits")


def _train(config: str, data: str, seed: int, storage: Path, extra: Sequence[str] = (), name: str | None = None) -> str:
    from imgcls_dist.train.job import run_training

    name = name or f"{config}_s{seed}"
    model = storage / name / "model.pt"
    if model.is_file():  # a rerun reuses what an earlier run of the bench trained
        return str(model)
    cfg = load_config(SHIPPED_CONFIGS / f"{config}.yaml", [f"data.path={data}", f"run.storage_path={storage}",
                                                           f"run.name={name}", f"train.seed={seed}",
                                                           "run.tensorboard=false", *extra])
    return run_training(cfg, report_test=False)["model"]


def _test_scores(predictor: EnsemblePredictor, data: str) -> dict[str, float]:
    ys, ps = [], []
    for y, arrays in labelled_batches(split_files(data, "test"), predictor.input_keys, 256):
        ok = y >= 0
        ys.append(y[ok])
        ps.append(predictor.predict_uint8({k: a[ok] for k, a in arrays.items()}))
    return _scores(np.concatenate(ps), np.concatenate(ys))


def _scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"test_acc": accuracy(probs, y), "test_nll": log_loss(probs, y)}


def _member_scores(models: dict[str, str], temperatures: list[float], data: str) -> dict[str, dict[str, Any]]:
    """Each member alone, no TTA, at T = 1 and at its fitted T: one pass over the test split for all members."""
    logits, y = collect_logits([EnsemblePredictor([m], views="none") for m in models.values()],
                               split_files(data, "test"), 256, None, lambda *a, **k: None)
    return {c: {**_scores(softmax(lg[0]), y), "T": t, "test_nll_T": log_loss(softmax(lg[0], t), y)}
            for c, lg, t in zip(models, logits, temperatures)}


def bench_ensemble(data: str = "data/digits-test30", configs: Sequence[str] = CONFIGS,
                   seeds: Sequence[int] = (0, 1, 2), storage: str = "runs/bench_ensemble") -> dict[str, Any]:
    root = Path(storage).resolve()
    rows, per_seed = [], []
    for seed in seeds:
        models = {c: _train(c, data, seed, root) for c in configs}
        doc = build_ensemble(list(models.values()), data, root / f"ensemble_s{seed}" / "ensemble.json", verbose=False)
        temps = [cand["temperature"] for cand in doc["validation"]["candidates"]]  # the builder keeps the order
        scores = _member_scores(models, temps, data)
        scores["plain mean"] = _test_scores(EnsemblePredictor(list(models.values()), views="none"), data)
        scores["built"] = _test_scores(load_predictor(root / f"ensemble_s{seed}" / "ensemble.json"), data)
        weights = {m["name"]: round(m["weight"], 3) for m in doc["models"]}
        for name, s in scores.items():
            rows.append({"seed": seed, "model": name, "test_acc": s["test_acc"], "test_nll": s["test_nll"],
                         "T": s.get("T"), "test_nll_T": s.get("test_nll_T"),
                         "weight": weights.get(f"{name}_s{seed}") if name in models else None,
                         "views": "+".join(doc["views"]) if name == "built" else None})
        best = max(configs, key=lambda c: (scores[c]["test_acc"], -scores[c]["test_nll"]))
        per_seed.append({"seed": seed, "best_member": best, "best_acc": scores[best]["test_acc"],
                         "best_nll": scores[best]["test_nll"], "best_nll_T": scores[best]["test_nll_T"],
                         "built_acc": scores["built"]["test_acc"],
                         "built_nll": scores["built"]["test_nll"], "plain_mean_acc": scores["plain mean"]["test_acc"],
                         "plain_mean_nll": scores["plain mean"]["test_nll"]})
    print(f"bench ensemble: {', '.join(configs)} x seeds {list(seeds)} on {data} (test split) — {machine()}")
    print_table(rows, list(rows[0]))
    print_table(per_seed, list(per_seed[0]))
    acc_ok = all(s["built_acc"] >= s["best_acc"] for s in per_seed)
    nll_ok = all(s["built_nll"] < s["best_nll"] for s in per_seed)
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in ("best_acc", "built_acc", "best_nll", "best_nll_T",
                                                                  "built_nll", "plain_mean_acc", "plain_mean_nll")}
    print(f"mean over seeds: built acc {mean['built_acc']:.4f} vs best member {mean['best_acc']:.4f} "
          f"(plain mean {mean['plain_mean_acc']:.4f}); built NLL {mean['built_nll']:.4f} vs best member "
          f"{mean['best_nll']:.4f} (T-scaled {mean['best_nll_T']:.4f}; plain mean {mean['plain_mean_nll']:.4f}); "
          f"built acc >= best every seed: {acc_ok}; built NLL < best every seed: {nll_ok}")
    return {"machine": machine(), "rows": rows, "per_seed": per_seed, "mean": mean, "acc_goal_met": acc_ok,
            "nll_goal_met": nll_ok}
