"""Everything one Train worker trains with, built once: accelerator, model, optimizer, schedule, streamed
loaders, restored from the run's latest checkpoint when there is one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.data.augment import build_batch_mix, build_eval_transform
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.models.registry import get_model, get_spec, replace_head
from imgcls_dist.models.transfer import apply_transfer, count_trainable, param_groups
from imgcls_dist.models.weights import CheckpointWeights, initial_weights
from imgcls_dist.train.data import make_eval_loader, make_train_loader
from imgcls_dist.predictor.precision import use_channels_last
from imgcls_dist.train.distill import Teacher
from imgcls_dist.train.mixed_precision import resolve_mixed_precision
from imgcls_dist.train.ema import build_ema
from imgcls_dist.train.optim import build_optimizer
from imgcls_dist.preemption import StopPoller
from imgcls_dist.train.preempt import Notices, build_notices
from imgcls_dist.train.schedulers import EpochSchedule
from imgcls_dist.train.state import EpochStats, ResumeState, merged, restore
from imgcls_dist.train.stream import EpochProgress, rank_rows
from imgcls_dist.train.tensorboard import TensorBoardLog


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class WorkerRun:
    cfg: ExperimentConfig
    dataset: dict[str, Any]  # train.job.resolve_dataset: classes, row groups, image size, hflip
    rank: int
    world: int
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: EpochSchedule
    train_loader: Any
    train_dataset: Any
    sampler: Any
    val_loader: Any
    mix: Any
    mean: list[float]
    std: list[float]
    channels_last: bool
    trainable_params: int
    start_epoch: int = 0
    start_step: int = 0  # batches of start_epoch already trained (a mid-epoch resume)
    partial: EpochStats | None = None  # this rank's totals of those batches
    history: list[dict] = field(default_factory=list)
    nonfinite_total: int = 0
    consecutive_bad: int = 0
    tensorboard: TensorBoardLog | None = None
    experiment: dict = field(default_factory=dict)  # the config as the checkpoint stores it
    transform_size: int | None = None
    class_weight: torch.Tensor | None = None  # train.class_weights, on the device
    ema: Any = None  # timm's ModelEmaV3 of the model (train.ema_decay), on every rank
    ema_updates: int = 0  # optimizer steps averaged in so far: the EMA decay warm-up's position
    teacher: Teacher | None = None  # train.teacher, on the device
    val_cache: list | None = None  # this worker's decoded validation batches, when they fit (loop.val_batches)
    bn_loader: Any = None  # this worker's share of the training split, un-augmented (train.precise_bn_batches)
    notices: Notices = field(default_factory=lambda: Notices(StopPoller(None)))  # stop request, node drains
    stopped_mid_epoch: bool = False  # a stop request ended the run inside an epoch (its checkpoint is written)
    rest: EpochProgress | None = None  # start_epoch's progress, when its rest is re-cut over this world

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_model(cfg: ExperimentConfig, classes: list[str], resume: ResumeState | None) -> torch.nn.Module:
    """The network with its initial weights (read once), transfer strategy applied, resumed weights loaded."""
    model_cfg = cfg.model
    spec = get_spec(model_cfg.arch)
    torch.manual_seed(derive_seed(cfg.train.seed, 0x1D17))  # same init on every run and rank: reruns are comparable
    weights = None if resume else initial_weights(model_cfg.weights)
    model = get_model(model_cfg.arch, num_classes=len(classes), in_channels=cfg.data.in_channels, weights=weights)
    if isinstance(weights, CheckpointWeights) and weights.classes is not None and weights.classes != list(classes):
        # A head trained on other classes is meaningless here even when its shape fits (0-4 -> 5-9).
        replace_head(model, spec.family, len(classes))
    apply_transfer(model, model_cfg.arch, model_cfg.transfer)
    if resume:
        model.load_state_dict(resume.model_state)
    return model


def _accelerator(cfg: ExperimentConfig, cuda: bool):
    from accelerate import Accelerator

    # torch.compile through accelerate's dynamo plugin: the model is compiled at prepare().
    return Accelerator(cpu=not cuda, mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, cuda),
                       gradient_accumulation_steps=cfg.train.grad_accum_steps,
                       dynamo_backend="inductor" if cfg.train.compile else None)


def _bn_loader(cfg: ExperimentConfig, ds: dict, rank: int, world: int):
    """Un-augmented training batches for train.precise_bn_batches, drawn like an epoch's (shuffled across row
    groups and in the buffer, always epoch 0's order): a rank's contiguous share in file order can hold a
    few classes only, and statistics of those mislead the others."""
    d = cfg.data
    size = ds["image_size"]
    return make_train_loader(ds["train_groups"], channels=d.in_channels, transform=build_eval_transform(size),
                             image_size=size, batch_size=d.batch_size, rank=rank, world=world, seed=cfg.train.seed,
                             shuffle_buffer=d.shuffle_buffer, loader_workers=d.loader_workers)[0]


def setup(loop_config: dict) -> WorkerRun:
    import ray.train

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ds: dict = loop_config["dataset"]
    train_cfg, data_cfg, aug_cfg = cfg.train, cfg.data, cfg.augment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = bool(loop_config.get("use_gpu")) and torch.cuda.is_available()
    accelerator = _accelerator(cfg, cuda)
    mean, std = (list(v) for v in get_spec(cfg.model.arch).normalization(data_cfg.in_channels))

    resume = restore(ray.train.get_checkpoint())
    model = build_model(cfg, ds["classes"], resume)
    trainable = count_trainable(model)
    groups = param_groups(model, cfg.model.arch, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                          layer_decay=cfg.model.layer_decay)
    optimizer = build_optimizer(groups, train_cfg)
    schedule = EpochSchedule(optimizer, train_cfg)
    if resume:
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
    # The predictor's layout rule: channels_last on GPUs, and on a CPU with bf16, where it made a training step
    # faster still than bf16 alone (docs/benchmarks.md, "Training steps").
    channels_last = use_channels_last(accelerator.mixed_precision, accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_loader, train_dataset, sampler = make_train_loader(
        ds["train_groups"], channels=data_cfg.in_channels, transform=None, image_size=ds["image_size"],
        batch_size=data_cfg.batch_size, rank=rank, world=world, seed=train_cfg.seed,
        shuffle_buffer=data_cfg.shuffle_buffer, loader_workers=data_cfg.loader_workers)
    val_loader = make_eval_loader(ds["val_groups"], channels=data_cfg.in_channels, image_size=ds["image_size"],
                                  batch_size=data_cfg.batch_size, rank=rank, world=world,
                                  loader_workers=data_cfg.loader_workers)

    # The LR schedule is not passed to prepare(): AcceleratedScheduler steps once per process per call,
    # which is right for per-iteration schedules but would advance our per-epoch one `world` times.
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.scaler is not None and resume and resume.scaler:
        accelerator.scaler.load_state_dict(resume.scaler)
    tb_dir = loop_config.get("tensorboard_dir")
    run = WorkerRun(
        cfg=cfg, dataset=ds, rank=rank, world=world, accelerator=accelerator, model=model, optimizer=optimizer,
        schedule=schedule, train_loader=train_loader, train_dataset=train_dataset, sampler=sampler,
        val_loader=val_loader, mix=build_batch_mix(aug_cfg.mixup_alpha, aug_cfg.cutmix_alpha, aug_cfg.mix_prob,
                                                   len(ds["classes"])),
        mean=mean, std=std, channels_last=channels_last, trainable_params=trainable,
        tensorboard=TensorBoardLog(tb_dir) if rank == 0 and tb_dir else None, experiment=loop_config["experiment"],
        class_weight=(torch.tensor(ds["class_weights"], dtype=torch.float32, device=accelerator.device)
                      if ds.get("class_weights") else None),
        ema=build_ema(accelerator.unwrap_model(model), train_cfg, resume.ema if resume else None),
        ema_updates=resume.ema_updates if resume else 0,
        teacher=Teacher(train_cfg.teacher, accelerator.device) if train_cfg.teacher else None,
        bn_loader=_bn_loader(cfg, ds, rank, world) if train_cfg.precise_bn_batches else None,
        notices=build_notices(loop_config, rank))
    if resume:
        if rank == 0:
            at = f", batch {resume.step + 1}/{len(sampler)}" if resume.step else ""
            print(f"resuming at epoch {resume.epoch + 1}/{train_cfg.epochs}{at} from the run's latest checkpoint",
                  flush=True)
        run.start_epoch, run.start_step, run.history = resume.epoch, resume.step, resume.history
        run.nonfinite_total, run.consecutive_bad = resume.nonfinite_total, resume.consecutive_bad
        if resume.partial is not None:
            _resume_inside_epoch(run, resume)
    return run


def _resume_inside_epoch(run: WorkerRun, resume: ResumeState) -> None:
    """Same world as the checkpoint's epoch: each rank continues its own share at the next batch. Another
    world (a node lost or added): the rest of the epoch is re-cut over this one (train/stream.py), and each
    rank takes over the partial totals of the old ranks it replaces (rank k's go to rank k mod world)."""
    p, world, rank = resume.progress, run.world, run.rank
    if len(resume.partial) == world and (p is None or (p.world == world and not p.recut)):
        run.partial = resume.partial[rank]
        return
    if p is None:  # a checkpoint written before progress was recorded
        raise RuntimeError(f"a mid-epoch checkpoint of {len(resume.partial)} workers cannot resume on {world}")
    run.rest, run.start_step = p, 0
    run.partial = merged([s for k, s in enumerate(resume.partial) if k % world == rank])
    if rank == 0:
        left = sum(rank_rows(run.sampler.n, k, p.world) - c for k, c in enumerate(p.consumed))
        print(f"the epoch began on {p.world} worker(s): its {left} samples left are re-cut over {world}",
              flush=True)
