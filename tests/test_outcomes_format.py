"""How a failure reads: the requirement, expected and actual, and a transcript whose repeats are folded."""

from __future__ import annotations

from conformance.outcomes import fold_transcript, format_failure


def test_repeated_transcript_lines_are_folded_in_order():
    transcript = ["< REQ 3", *["> DATA 3 32768 bytes"] * 160, "> DATA 3 12 bytes", "> DATA 3 0 bytes",
                  "> DATA 3 0 bytes"]
    assert fold_transcript(transcript) == ["< REQ 3", "> DATA 3 32768 bytes ×160", "> DATA 3 12 bytes",
                                           "> DATA 3 0 bytes ×2"]
    assert fold_transcript([]) == [] and fold_transcript(["a", "b", "a"]) == ["a", "b", "a"]


def test_a_long_transfer_fits_the_report():
    text = format_failure("DIFFCOPY-DATA-1", "the file", "a short file",
                          ["< REQ 1"] + ["> DATA 1 32768 bytes"] * 5000 + ["> DATA 1 0 bytes"])
    assert "DIFFCOPY-DATA-1" in text and "> DATA 1 32768 bytes ×5000" in text
    assert "5002 lines, repeats folded" in text and len(text.splitlines()) < 12
