"""The bad-rows document that training (OUTPUT_DIR/bad_rows.json) and evaluation (eval_report.json's "bad_rows")
share, so that one reader handles both."""

from collections import Counter
from typing import Sequence


def bad_rows_document(entries: Sequence[dict]) -> dict:
    """{"count", "by_reason", "rows"} of report entries, each a dict with at least "row" and "reason"."""
    return {"count": len(entries), "by_reason": dict(Counter(entry["reason"] for entry in entries)),
            "rows": list(entries)}
