"""train.compile: the model goes through torch.compile (accelerate's dynamo plugin, inductor) at prepare();
off by default. Checked on CPU without running the compile (which takes minutes there)."""

from __future__ import annotations

import torch

from imgcls_dist.config import load_config
from imgcls_dist.models.registry import get_model
from imgcls_dist.train.setup import _accelerator


def test_compile_wraps_the_model_only_when_asked(fresh_accelerate_state):
    plain = _accelerator(load_config(None, []), cuda=False)
    assert not isinstance(plain.prepare(get_model("lenet5", 10)), torch._dynamo.eval_frame.OptimizedModule)


def test_compile_on(fresh_accelerate_state):
    acc = _accelerator(load_config(None, ["train.compile=true"]), cuda=False)
    assert str(acc.state.dynamo_plugin.backend).lower().endswith("inductor")
    assert isinstance(acc.prepare(get_model("lenet5", 10)), torch._dynamo.eval_frame.OptimizedModule)
