"""decode_image on hostile bytes: every truncation of a small valid file of each whitelisted format, and seeded
mutations (the fuzz benchmark's cases, fewer of them), all honour the contract: an HxWxC uint8 array xor a
one-line error, never an exception. `python -m benchmarks fuzz` runs 100,000 such cases in child processes."""

from __future__ import annotations

from benchmarks.fuzz_bench import FORMATS, case, contract_violation, seed_files
from imgcls_dist.data.decode import decode_image


def test_the_seed_files_decode():
    seeds = seed_files()
    assert set(seeds) == set(FORMATS)
    for fmt, data in seeds.items():
        arr, err = decode_image(data)
        assert err is None and arr.shape == (16, 24, 3), fmt


def test_every_truncation_of_every_format_is_an_array_or_one_line():
    for fmt, data in seed_files().items():
        for n in range(len(data)):
            result = decode_image(data[:n], min_size=8 if n % 2 else None)
            assert contract_violation(result) is None, (fmt, n, result.error)
        assert decode_image(data[:0]).error  # empty bytes: an error, not an array


def test_seeded_mutations_keep_the_contract():
    seeds, decoded = seed_files(), 0
    for i in range(3000):
        kind, data = case(1, i, seeds)
        result = decode_image(data, max_pixels=4_000_000)
        assert contract_violation(result) is None, (i, kind, result.error)
        decoded += result.array is not None
    assert 0 < decoded < 3000  # the mutations reach both outcomes: the test is not vacuous
