"""Export a model file, or an ensemble.json, to ONNX: uint8 NCHW images in, class probabilities out.

The preprocessing travels with the file: the graph divides by 255 and normalizes with the model file's
mean/std (`models.preprocess.normalize`, called inside the traced module), then returns
softmax(logits / temperature), combined over an ensemble's members with the manifest's weights. Axis 0
(`batch`) is dynamic; the spatial size and channels are the model file's.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript's torchlib), at opset 18:
the opset torchlib is written in (no version conversion pass), and one every onnxruntime >= 1.14 runs.

An ensemble whose members share image_size and in_channels, combined by "mean" or "weighted", becomes one
graph. Otherwise (members of several input sizes, or "vote", which is no smooth sum of probabilities) each
member is exported on its own, at its own temperature, beside an ensemble.json that lists them with the
weights and the combine rule. TTA views are not exported: the graph computes the identity view only.

Every exported file is run in ONNX Runtime at batch 1 and 7 against the PyTorch predictor
(`EnsemblePredictor`, views "none", fp32 on the CPU) before the export counts as done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.models.checkpoint import MODEL_FILE
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.predictor.manifest import ENSEMBLE_FILE, EnsembleSpec, as_list, resolve_model_args
from imgcls_dist.predictor.onnx_runtime import BATCH_AXIS, OPSET, export_program, require_runtime
from imgcls_dist.predictor.predictor import EnsemblePredictor, InputKey, Member
from imgcls_dist.storage import PathLike, location

FORMATS = ("onnx",)
FORMAT_VERSION = "1"  # of the metadata_props below; bumped when a key changes meaning
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
CHECK_BATCHES = (1, 7)
TOLERANCE = 1e-4  # max |p_onnx - p_torch|, fp32 on the CPU


@dataclass
class ExportedFile:
    path: Path
    members: list[Member]  # what the graph computes: several members = one combined graph
    key: InputKey  # (image_size, in_channels) of its input
    input_shape: list = field(default_factory=list)  # as ONNX Runtime reads it, e.g. ['batch', 3, 32, 32]
    max_diff: float = float("nan")


@dataclass
class ExportResult:
    source: str
    files: list[ExportedFile]
    combine: str
    manifest: Path | None = None  # the ensemble.json beside member files, when members could not share a graph
    split_reason: str = ""
    dropped_views: list[str] = field(default_factory=list)  # a manifest's TTA views but identity: in no graph


# ---------------------------------------------------------------------------------------------- the graph


class ProbabilityGraph(nn.Module):
    """uint8 NCHW -> sum over members of weight * softmax(model(normalize(x)) / temperature): the predictor's
    arithmetic for the identity view (predictor.EnsemblePredictor._member_probs and _combine)."""

    def __init__(self, members: Sequence[Member], weighted: bool):
        super().__init__()
        self.nets = nn.ModuleList(m.model for m in members)
        self.stats = [(list(m.meta["mean"]), list(m.meta["std"]), m.temperature, m.weight) for m in members]
        self.weighted = weighted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for net, (mean, std, temperature, weight) in zip(self.nets, self.stats):
            logits = net(normalize(images, mean, std))
            # A temperature of 1 and a lone member's weight add no node: a model file's graph is model + softmax.
            probs = (logits if temperature == 1.0 else logits / temperature).softmax(dim=-1)
            probs = probs * weight if self.weighted else probs
            total = probs if total is None else total + probs
        return total


def export_graph(members: Sequence[Member], path: Path, metadata: dict[str, str]) -> None:
    """Trace `members` as one ProbabilityGraph and write it, metadata included, as one self-contained file."""
    graph = ProbabilityGraph(members, weighted=len(members) > 1)
    program = export_program(graph, members[0].key, INPUT_NAME, OUTPUT_NAME, str(path))
    program.model.metadata_props.update(metadata)
    program.model.doc_string = "imgcls-dist: uint8 NCHW images -> class probabilities"
    path.parent.mkdir(parents=True, exist_ok=True)
    # external_data=False: the weights go inside the .onnx (torch still splits them out above 2 GB).
    program.save(path, external_data=False)


def graph_metadata(members: Sequence[Member], source: str, combine: str) -> dict[str, str]:
    """metadata_props: strings only (ONNX's rule), lists and objects as JSON. An ensemble's mean/std are
    its members' lists, in member order; `arch` is "ensemble" and `members` says who is inside."""
    first = members[0].meta
    md = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "classes": json.dumps(list(first["classes"])),
        "image_size": str(members[0].key[0]),
        "in_channels": str(members[0].key[1]),
        "input": f"{INPUT_NAME}: uint8 [{BATCH_AXIS}, C, H, W], 0..255, RGB (C=3) or gray (C=1)",
        "output": f"{OUTPUT_NAME}: float32 [{BATCH_AXIS}, classes], softmax(logits / temperature)",
        "tta_views": "identity",
    }
    if len(members) == 1:
        return {**md, "arch": str(first["arch"]), "mean": json.dumps(list(first["mean"])),
                "std": json.dumps(list(first["std"])), "temperature": repr(members[0].temperature)}
    return {**md, "arch": "ensemble", "combine": combine,
            "mean": json.dumps([list(m.meta["mean"]) for m in members]),
            "std": json.dumps([list(m.meta["std"]) for m in members]),
            "members": json.dumps([{"source": m.path, "arch": m.meta["arch"], "weight": m.weight,
                                    "temperature": m.temperature} for m in members])}


# ---------------------------------------------------------------------------------------------- the check


def _sessions(files: Sequence[ExportedFile]) -> list:
    """An ONNX Runtime session per file, after checking that its batch axis is the symbolic one."""
    import onnxruntime as ort

    sessions = []
    for f in files:
        sessions.append(ort.InferenceSession(str(f.path), providers=["CPUExecutionProvider"]))
        f.input_shape = list(sessions[-1].get_inputs()[0].shape)
        if f.input_shape[0] != BATCH_AXIS:
            raise JobFailed(f"{f.path}: the batch axis is fixed at {f.input_shape[0]}, not dynamic")
    return sessions


def _run(session, f: ExportedFile, x: np.ndarray, want: np.ndarray) -> float:
    """max |ONNX Runtime's probabilities - `want`| for the batch x."""
    try:
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no useful base class
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise JobFailed(f"{f.path}: ONNX Runtime cannot run a batch of {len(x)} ({first})") from None
    if got.shape != want.shape:
        raise JobFailed(f"{f.path}: a batch of {len(x)} gave shape {list(got.shape)}, expected {list(want.shape)}")
    return float(np.abs(got - want).max())


def check_files(predictor: EnsemblePredictor, files: Sequence[ExportedFile], combined: bool) -> None:
    """Run each file in ONNX Runtime at every CHECK_BATCHES size on random uint8 images and compare with the
    predictor: its ensembled output (`combined`, one graph) or, file i, member i's own probabilities."""
    sessions = _sessions(files)
    rng = np.random.default_rng(0)
    diffs = [0.0] * len(files)
    for n in CHECK_BATCHES:
        xs = {k: rng.integers(0, 256, (n, k[1], k[0], k[0]), dtype=np.uint8) for k in predictor.input_keys}
        ref, per_member = predictor.predict_uint8({k: torch.from_numpy(v) for k, v in xs.items()},
                                                  return_members=True)
        for i, (f, s) in enumerate(zip(files, sessions)):
            diffs[i] = max(diffs[i], _run(s, f, xs[f.key], ref if combined else per_member[i]))
    for f, d in zip(files, diffs):
        f.max_diff = d
        if not d <= TOLERANCE:  # not `>`: a NaN fails too
            raise JobFailed(f"{f.path}: ONNX Runtime and PyTorch differ by {d:.2e} in probability "
                            f"(> {TOLERANCE:g}); do not use this file")


# ---------------------------------------------------------------------------------------------- the command


def resolve_source(models: PathLike | Sequence[PathLike]) -> tuple[EnsembleSpec, str]:
    """--models -> (spec, the file it came from: the ensemble.json, or the model file)."""
    items = as_list(models)
    if len(items) != 1:
        raise UserError(f"--models: export takes one model file, run directory or ensemble.json, got {len(items)} "
                        f"(several models: write an ensemble.json, e.g. with `imgcls-dist ensemble build`)")
    if str(items[0]).endswith(".json") and not location(items[0]).is_file():
        raise UserError(f"{items[0]}: no such ensemble manifest")
    spec = resolve_model_args(items)
    return spec, spec.manifest or spec.paths[0]


def output_dir(source: str, out: PathLike | None) -> Path:
    """--out, or the input's own directory; local only (the exporter and ONNX Runtime write and read files)."""
    if out is not None:
        if location(out).is_local:
            return Path(location(out).path)
        raise UserError(f"--out {out}: must be a local directory")
    src = location(source)
    if not src.is_local:
        raise UserError(f"{source}: a remote model; give --out DIR, a local directory for the .onnx file")
    return Path(src.path).parent


def export_name(source: str) -> str:
    """runs/a/model.pt -> "a", ens/digits/ensemble.json -> "digits", b.pt -> "b": the generic file names would
    make every export model.onnx, and several of them in one --out would overwrite each other."""
    src = location(source)
    generic = (Path(MODEL_FILE).stem, Path(ENSEMBLE_FILE).stem)
    return src.parent.name if src.stem in generic and src.parent.name else src.stem


def split_reason(predictor: EnsemblePredictor) -> str:
    """Why the members cannot be one graph, or "" when they can."""
    if len(predictor.input_keys) > 1:
        sizes = ", ".join(f"{s}px/{c}ch" for s, c in predictor.input_keys)
        return f"members take different inputs ({sizes})"
    if predictor.combine == "vote":
        return "combine 'vote' counts argmax votes, not a sum of probabilities"
    return ""


def write_members_manifest(predictor: EnsemblePredictor, files: Sequence[ExportedFile], path: Path,
                           source: str) -> None:
    """ensemble.json beside member .onnx files, in the manifest format (predictor/manifest.py). Each member's
    graph already divides by its temperature: `temperature_in_graph` says so, and `temperature` keeps the
    value for reference."""
    entries = [{"path": f.path.name, "source": m.path, "temperature": m.temperature,
                **({"weight": m.weight} if predictor.combine != "mean" else {})}
               for f in files for m in f.members]
    doc = {"models": entries, "combine": predictor.combine, "format": "onnx", "temperature_in_graph": True,
           "source": source}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def export_onnx(models: PathLike | Sequence[PathLike], out: PathLike | None = None, fmt: str = "onnx") -> ExportResult:
    """Export a model file, run directory or ensemble.json to ONNX and check it against the PyTorch predictor."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    require_runtime("ONNX export")
    spec, source = resolve_source(models)
    dest = output_dir(source, out)
    # fp32: the graph is fp32, and the check's tolerance is for fp32 (precision "auto" may pick bf16 on a CPU)
    predictor = EnsemblePredictor.from_spec(spec, views="none", device="cpu", precision="fp32")
    reason = split_reason(predictor)
    result = ExportResult(source, [], predictor.combine, split_reason=reason,
                          dropped_views=[v for v in spec.views or [] if v != "identity"])
    if reason:
        export_members(predictor, dest / f"{export_name(source)}-onnx", source, result)
    else:
        f = ExportedFile(dest / f"{export_name(source)}.onnx", list(predictor.members), predictor.members[0].key)
        export_graph(f.members, f.path, graph_metadata(f.members, source, predictor.combine))
        result.files.append(f)
        check_files(predictor, result.files, combined=True)
    return result


def export_members(predictor: EnsemblePredictor, folder: Path, source: str, result: ExportResult) -> None:
    """One file per member in `folder`, checked, then the ensemble.json that lists them."""
    for i, m in enumerate(predictor.members):
        f = ExportedFile(folder / f"member{i}.onnx", [m], m.key)
        export_graph([m], f.path, graph_metadata([m], m.path, predictor.combine))
        result.files.append(f)
    check_files(predictor, result.files, combined=False)
    result.manifest = folder / ENSEMBLE_FILE
    write_members_manifest(predictor, result.files, result.manifest, source)


def format_result(r: ExportResult) -> str:
    """What `imgcls-dist export` prints: how members were exported, then each file with its size, opset,
    input shape and check."""
    lines = []
    if r.manifest is not None:
        lines.append(f"members exported separately ({r.split_reason}): {r.manifest} lists them, "
                     f"combine {r.combine}")
    elif len(r.files[0].members) > 1:
        ms = r.files[0].members
        lines.append(f"one graph: {len(ms)} members, combine {r.combine}, weights "
                     f"{', '.join(f'{m.weight:.4g}' for m in ms)}, temperatures "
                     f"{', '.join(f'{m.temperature:.4g}' for m in ms)}")
    for f in r.files:
        lines += _file_lines(f, show_source=r.manifest is not None)
    return "\n".join(lines)


def _file_lines(f: ExportedFile, show_source: bool) -> list[str]:
    shape = ", ".join(str(d) for d in f.input_shape)
    batches = " and ".join(map(str, CHECK_BATCHES))
    return [f"{f.path}  {f.path.stat().st_size / 1e6:.2f} MB  opset {OPSET}",
            *([f"  from   {f.members[0].path}"] if show_source else []),
            f"  input  {INPUT_NAME}: uint8 [{shape}] ({BATCH_AXIS} is dynamic)",
            f"  output {OUTPUT_NAME}: float32 [{BATCH_AXIS}, {len(f.members[0].meta['classes'])}]",
            f"  check: ONNX Runtime vs PyTorch at batch {batches}: max |diff| {f.max_diff:.2e} <= {TOLERANCE:g}, ok"]


def views_note(r: ExportResult) -> str:
    views = f" (the manifest's views {','.join(r.dropped_views)} are not applied)" if r.dropped_views else ""
    return f"note: TTA views are not exported; the graph computes the identity view only{views}"
