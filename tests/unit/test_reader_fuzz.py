"""The readers of the files the system writes, on hostile copies of those files: seeded cases (the fuzz
benchmark's reader cases, fewer of them) keep every reader's contract - its result, or its one-line refusal,
never another exception - and a hostile model file or YAML tag is refused without running anything.
`python -m benchmarks fuzz --target readers` runs 16,000 such cases in child processes."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.reader_fuzz_cases import EXECUTED, ReaderCase, malicious_model, marker_name, reader_case
from benchmarks.reader_fuzz_contract import prepare_workspace, reader_outcome
from benchmarks.reader_fuzz_seeds import READERS, reader_seeds
from imgcls_dist.config import load_config
from imgcls_dist.errors import UserError
from imgcls_dist.models.registry import build_model_from_file

CASES_PER_READER = 200
# What each hostile call of `malicious_model` pickles as (the name the refusal gives).
HOSTILE_GLOBALS = ("posix.system", "exec", "eval", "call", "open", "posix.mkdir")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader-fuzz")
    seeds = reader_seeds(root / "seed")
    return seeds, prepare_workspace(root / "ws", seeds)


def test_the_seed_files_read_back(seeded):
    seeds, ws = seeded
    for reader in READERS:
        assert reader_outcome(ReaderCase(reader, "seed", seeds.files[reader]), ws, seeds, EXECUTED) == ("ok", None)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # a hostile value is a sparse tensor
@pytest.mark.parametrize("reader", READERS)
def test_seeded_mutations_keep_the_contract(seeded, reader):
    seeds, ws = seeded
    outcomes, violations = Counter(), []
    for i in range(READERS.index(reader), CASES_PER_READER * len(READERS), len(READERS)):
        case = reader_case(1, i, seeds)
        outcome, why = reader_outcome(case, ws, seeds, marker_name(1, i))
        outcomes[outcome] += 1
        if why:
            violations.append((i, case.mutation, why))
    assert not violations, violations[:5]
    assert outcomes["ok"] > 0  # the mutations reach both outcomes: the test is not vacuous
    assert outcomes["refused"] > 0 or reader == "lease"  # a damaged lease is a stale one, never an error


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("how", range(len(HOSTILE_GLOBALS)), ids=HOSTILE_GLOBALS)
def test_a_hostile_model_file_is_refused_without_running(tmp_path, monkeypatch, how, legacy):
    marker = tmp_path / "executed"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(malicious_model(str(marker), how, where=how % 4, legacy=legacy))
    # torch's switch that turns weights_only off wherever a caller did not pass it: ours always passes True
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UserError, match=f"refused by the weights-only unpickler.*{HOSTILE_GLOBALS[how]}") as e:
        build_model_from_file(tmp_path / "run")
    assert "\n" not in str(e.value) and "model.pt" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("value", [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/new:builtins.exec [\"open('{m}', 'w').close()\"]",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {m}']",
], ids=["apply", "new", "verbatim-tag"])
def test_a_yaml_python_tag_is_refused_without_running(tmp_path, value):
    marker = tmp_path / "executed"
    value = value.format(m=marker)
    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  lr: {value}\n")
    with pytest.raises(UserError, match="line 2 not valid YAML .*constructor for the tag.*python/object"):
        load_config(config)
    with pytest.raises(UserError, match="--set .train.lr=.*value is not valid YAML .*python/object"):
        load_config(None, [f"train.lr={value}"])
    assert not marker.exists()


def test_a_tag_directive_cannot_rename_a_python_tag(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "config.yaml"
    config.write_text(f"%TAG !x! tag:yaml.org,2002:python/\n---\ntrain:\n  lr: !x!object/apply:os.system "
                      f"['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML .*python/object/apply:os.system"):
        load_config(config)
    assert not marker.exists()
