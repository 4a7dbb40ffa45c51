"""`imgcls-dist` console script. Each subcommand parses arguments and calls one library function.

Imports are lazy so `imgcls-dist models` or a config error answers without importing Ray.
What `imgcls-dist --help` tells a user is DESCRIPTION and EPILOG below, not this docstring.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcls_dist.config import add_config_args
from imgcls_dist.errors import JobFailed, Stopped, UserError


def _fractions(s: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three numbers like 0.7,0.15,0.15")
    return parts  # type: ignore[return-value]


def _class_names(s: str) -> list[str]:
    names = [c.strip() for c in s.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{s!r}: expected class names like 0,1,2 or cat,dog")
    return names


def cmd_ingest(a: argparse.Namespace) -> int:
    from imgcls_dist.data.ingest import ingest, print_summary

    meta = ingest(a.src, a.out, image_size=a.image_size, fractions=a.splits, rows_per_shard=a.rows_per_shard,
                  seed=a.seed, overwrite=a.overwrite, classes=a.classes)
    print_summary(meta, a.out)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from imgcls_dist.models.registry import models_table

    print(models_table(a.pattern))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from imgcls_dist.config import load_config

    # the config is complete before Ray is imported: a typo answers in milliseconds
    if a.config:
        if a.data or a.arch or a.recipe:
            raise UserError("train: give either --config or --data/--arch/--recipe (the quick start), not both; "
                            "--set works with either")
        cfg = load_config(a.config, a.overrides)
    else:
        if not (a.data and a.arch):
            raise UserError("train: needs --config FILE, or --data DATASET and --arch NAME (the quick start)")
        from imgcls_dist.train.recipes import quickstart_config

        cfg = quickstart_config(a.data, a.arch, a.recipe, a.overrides)
    from imgcls_dist.train.job import run_training

    result = run_training(cfg)
    print(f"run directory: {result['run_dir']}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from imgcls_dist.demo import run_demo

    run_demo(Path(a.workdir), quick=a.quick)
    return 0


DESCRIPTION = """\
Image classification on Ray: turn image folders into Parquet shards, fine-tune
CNNs, search hyperparameters, build ensembles on validation data, and classify
images in batch, one at a time or over HTTP. Runs on one machine (a local Ray)
or unchanged on a Ray cluster."""

EPILOG = """\
usual order: ingest -> train (or tune, or study) -> ensemble build -> infer -> evaluate;
             predict and serve answer for single images
try it:      make demo    (every step on the built-in digits, a few minutes)
more:        imgcls-dist VERB --help, e.g. imgcls-dist train --help;
             README.md and the guides in docs/guide/"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imgcls-dist", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, title="verbs", metavar="VERB",
                            help="one of:")

    p = sub.add_parser("ingest", help="image tree (local, s3://, gs://) or builtin:digits -> Parquet shards + dataset.json")
    p.add_argument("src", help="SRC/<class>/<image> or SRC/<split>/<class>/<image> (local, s3:// or gs://), "
                               "or builtin:digits")
    p.add_argument("out", help="output dataset directory (local, s3:// or gs://)")
    p.add_argument("--image-size", type=int, default=32, help="builtin datasets: side length to upscale to")
    p.add_argument("--splits", type=_fractions, default=(0.7, 0.15, 0.15),
                   help="train,val,test fractions (ignored for a pre-split tree, which keeps its splits)")
    p.add_argument("--rows-per-shard", type=int, default=500, help="images per Parquet shard (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")
    p.add_argument("--classes", type=_class_names, default=None, metavar="A,B,...",
                   help="ingest only these classes (by folder name; builtin:digits: 0..9), e.g. a pretraining "
                        "source of some classes and a target of the others")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("models", help="list registered architectures")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'resnet*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="fine-tune a model with Ray Train + accelerate",
                       description="Train from a config file (--config), or from a dataset, an architecture and a "
                                   "recipe (--data, --arch, --recipe: the quick start, no config file to write).")
    add_config_args(p, required=False)
    p.add_argument("--data", help="quick start: an ingested dataset directory (local, s3:// or gs://)")
    p.add_argument("--arch", help="quick start: an architecture name (imgcls-dist models lists them)")
    p.add_argument("--recipe", help="quick start: small_images, photos_finetune or photos_scratch "
                                    "(default: chosen from the dataset's image size and the weights in the cache)")
    p.set_defaults(func=cmd_train)

    from imgcls_dist.batch.commands import register_infer_command
    from imgcls_dist.evaluate.commands import register_evaluate_command
    from imgcls_dist.predictor.commands import register_predict_command

    register_infer_command(sub)
    register_predict_command(sub)
    register_evaluate_command(sub)
    from imgcls_dist.export.commands import register_export_command

    register_export_command(sub)
    from imgcls_dist.serve.commands import register_serve_command

    register_serve_command(sub)
    from imgcls_dist.tune.commands import register_tune_commands

    register_tune_commands(sub)
    from imgcls_dist.study.commands import register_study_command

    register_study_command(sub)
    from imgcls_dist.ensemble.commands import register_ensemble_commands

    register_ensemble_commands(sub)  # ensemble build
    from imgcls_dist.register.commands import register_register_command

    register_register_command(sub)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in digits")
    p.add_argument("--workdir", default="runs/demo", help="where the data, runs, predictions and report go "
                   "(default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny epochs (smoke run)")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Stopped as e:
        print(f"imgcls-dist {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (UserError, JobFailed) as e:
        print(f"imgcls-dist {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"imgcls-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
