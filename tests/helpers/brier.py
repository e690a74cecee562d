"""BrierLM aggregation by hand, for the tests: Brier-n = Σ estimates / positions and
BrierLM = 100 · (Π max(Brier-n, 0))^(1/4) (docs/method.md, 'BrierLM'), in plain Python floats."""
import math


def brier_by_hand(scores) -> tuple[list[float], float]:
    """(Brier-1..n, BrierLM) of brier_calm's or brier_transformer's {"sum", "count"}; also checks that the
    sums are whole numbers within the counts (each two-sample estimate 1[a = y] + 1[b = y] − 1[a = b]
    is −1, 0 or 1)."""
    sums, counts = scores["sum"].tolist(), scores["count"].tolist()
    assert all(s == round(s) and abs(s) <= c for s, c in zip(sums, counts)), (sums, counts)
    briers = [s / c for s, c in zip(sums, counts)]
    return briers, 100.0 * math.prod(max(b, 0.0) for b in briers) ** (1 / len(briers))
