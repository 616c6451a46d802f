"""reporting.markdown: the one table helper every report uses."""

from tftransfer.reporting.markdown import escape_cell, table


def test_table_escapes_pipes_backslashes_and_newlines_and_aligns():
    lines = table(["a", "b"], [["x|y", "c:\\d\ne"]], "--- ---:")
    assert lines == ["| a | b |", "| --- | ---: |", "| x\\|y | c:\\\\d e |"]
    assert table(["a"], [["**bold|**"]], escape=False)[2] == "| **bold|** |"
    assert escape_cell(3.5) == "3.5"
