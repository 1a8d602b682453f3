"""utils/bad_rows.py: the bad-rows document shared by training and evaluation reports."""

from utils.bad_rows import bad_rows_document


def test_counts_rows_and_reasons_and_keeps_each_entry_in_order():
    entries = [{"row": 3, "reason": "bad_conditioning_image", "file": "a.png"},
               {"row": 7, "reason": "missing_image"},
               {"row": 9, "reason": "bad_conditioning_image", "file": "b.npy"}]
    document = bad_rows_document(entries)
    assert document == {"count": 3, "by_reason": {"bad_conditioning_image": 2, "missing_image": 1}, "rows": entries}
    assert list(document) == ["count", "by_reason", "rows"]


def test_no_rows_is_a_document_of_zero():
    assert bad_rows_document([]) == {"count": 0, "by_reason": {}, "rows": []}
