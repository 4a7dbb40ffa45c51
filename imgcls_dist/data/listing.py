"""What an image tree holds, from one listing (paths only, no image bytes): classes, labels, splits.

Two layouts, on any filesystem of `imgcls_dist.storage`:

* ImageFolder: `SRC/<class>/**/<image>`; ingest splits it (stratified) itself.
* Pre-split (ImageNet style): `SRC/<split>/<class>/**/<image>` with `<split>` one of train, val (or valid,
  validation), test. The tree's splits are kept; every class of val/test must exist in train.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from imgcls_dist.errors import UserError
from imgcls_dist.storage import Location

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Listing:
    classes: list[str]
    paths: list[str]  # relative to SRC, '/'-separated; also the row id
    labels: list[int]
    splits: list[str] | None  # per path, for a pre-split tree; None: ingest splits
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _image_paths(src: Location) -> tuple[list[list[str]], int]:
    """Relative paths of image files as path parts (hidden files and folders skipped), and the count of
    other files."""
    out, other = [], 0
    for f in src.files():
        parts = f.relative_to(src).split("/")
        if any(p.startswith(".") for p in parts):
            continue
        if f.suffix.lower() in IMAGE_SUFFIXES:
            out.append(parts)
        else:
            other += 1
    return out, other


def _tree_kind(src: Location, tops: set[str]) -> bool:
    """True for a pre-split tree; an error when split folders sit beside class folders."""
    splits = {t for t in tops if t.lower() in SPLIT_ALIASES}
    if not splits:
        return False
    if splits != tops:
        raise UserError(f"{src}: split folders ({', '.join(sorted(splits))}) beside other folders "
                        f"({', '.join(sorted(tops - splits)[:5])}): use SRC/<class>/... or SRC/<split>/<class>/...")
    canonical = Counter(SPLIT_ALIASES[t.lower()] for t in splits)
    dup = [s for s, n in canonical.items() if n > 1]
    if dup:
        names = sorted(t for t in splits if SPLIT_ALIASES[t.lower()] == dup[0])
        raise UserError(f"{src}: folders {' and '.join(names)} are both the {dup[0]} split; keep one")
    if "train" not in canonical:
        raise UserError(f"{src}: a pre-split tree needs a train/ folder (found {', '.join(sorted(splits))})")
    return True


def list_image_tree(src: Location) -> Listing:
    entries, other = _image_paths(src)
    top_level_files = sum(1 for e in entries if len(e) == 1)
    nested = [e for e in entries if len(e) >= 2]
    if not nested:
        raise UserError(f"{src}: no images in class folders (expected SRC/<class>/<image> or "
                        f"SRC/<split>/<class>/<image>)")
    notes = []
    if top_level_files:
        notes.append(f"{top_level_files} image(s) directly in {src} have no class folder: ignored")
    if other:
        notes.append(f"{other} non-image file(s) ignored (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if not _tree_kind(src, {e[0] for e in nested}):
        classes = sorted({e[0] for e in nested})
        index = {c: i for i, c in enumerate(classes)}
        return Listing(classes, ["/".join(e) for e in nested], [index[e[0]] for e in nested], None, notes)

    in_split = [e for e in nested if len(e) >= 3]
    if len(in_split) < len(nested):
        notes.append(f"{len(nested) - len(in_split)} image(s) directly in split folders have no class folder: ignored")
    by_split: dict[str, set[str]] = {}
    for e in in_split:
        by_split.setdefault(SPLIT_ALIASES[e[0].lower()], set()).add(e[1])
    if "train" not in by_split:
        raise UserError(f"{src}: train/ holds no class folders with images")
    classes = sorted(by_split["train"])
    for split, names in sorted(by_split.items()):
        extra = sorted(names - by_split["train"])
        if extra:
            raise UserError(f"{src}: class '{extra[0]}' is in {split}/ but missing from train/ "
                            f"(classes must agree across splits)")
        missing = sorted(by_split["train"] - names)
        if missing:
            notes.append(f"{split}/ has no images of {len(missing)} class(es): {', '.join(missing[:5])}")
    for split in ("val", "test"):
        if split not in by_split:
            notes.append(f"no {split} folder: the {split} split is empty")
    index = {c: i for i, c in enumerate(classes)}
    return Listing(classes, ["/".join(e) for e in in_split], [index[e[1]] for e in in_split],
                   [SPLIT_ALIASES[e[0].lower()] for e in in_split], notes)


def relabel_classes(classes: Sequence[str], wanted: Sequence[str], src: str) -> tuple[list[str], dict[int, int]]:
    """(the kept class names, old label -> new label): the `wanted` classes, labelled 0..k-1 in the dataset's
    class order; an unknown name is an error naming it."""
    unknown = [w for w in wanted if w not in classes]
    if unknown:
        raise UserError(f"--classes: {', '.join(map(repr, unknown))} not a class of {src} "
                        f"(classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''})")
    keep = [i for i, c in enumerate(classes) if c in set(wanted)]
    return [classes[i] for i in keep], {old: new for new, old in enumerate(keep)}


def keep_classes(listing: Listing, wanted: Sequence[str], src: str) -> Listing:
    """The listing restricted to some classes, labelled 0..k-1 in the dataset's class order."""
    classes, new = relabel_classes(listing.classes, wanted, src)
    rows = [i for i, lbl in enumerate(listing.labels) if lbl in new]
    return Listing(classes=classes, paths=[listing.paths[i] for i in rows],
                   labels=[new[listing.labels[i]] for i in rows],
                   splits=None if listing.splits is None else [listing.splits[i] for i in rows],
                   notes=listing.notes)

