"""The one console table formatter every command's table goes through."""

from __future__ import annotations

from imgcls_dist.table import format_table


def test_columns_pad_to_their_widest_cell_under_a_rule():
    out = format_table(["name", "acc"], [["resnet18", "0.99"], ["lenet5", ""]])
    assert out.splitlines() == [
        "name      acc",
        "--------  ----",
        "resnet18  0.99",
        "lenet5",  # no trailing blanks
    ]


def test_a_table_without_rows_is_its_header_and_rule():
    assert format_table(["trial", "val_acc"], []) == "trial  val_acc\n-----  -------"
