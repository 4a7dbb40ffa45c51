"""Relaying each Train epoch report to the Tune trial that launched the run (Train V2 pattern).

`TuneReportCallback` forwards rank 0's metrics (plus the checkpoint path) from the Train controller to
the trial; mid-epoch checkpoint reports are not relayed. We add `epochs_done` (= epoch + 1), which is what
ASHA measures time in: unlike Tune's `training_iteration`, it stays right when a resumed trial's Train run
continues from epoch k (its first report is then epoch k, while a fresh trial actor would count that as
iteration 1).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from imgcls_dist.train.state import MID_EPOCH

TIME_ATTR = "epochs_done"


class EpochReportCallback(TuneReportCallback):
    def after_report(self, run_context, metrics: List[Dict[str, Any]], checkpoint: Optional[Any]):
        if metrics and metrics[0].get(MID_EPOCH):
            return  # a mid-epoch checkpoint (train/checkpointing.py): ASHA compares whole epochs only
        if metrics and "epoch" in metrics[0]:
            metrics = [{**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)
