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


def brierlm_of(scores: dict, prefix: str = "") -> float:
    """BrierLM from a result's own Brier-1..4 (keys `prefix + "brier_n"`): 100 · geometric mean of max(Brier-n, 0)."""
    return 100.0 * math.prod(max(scores[f"{prefix}brier_{n}"], 0.0) for n in range(1, 5)) ** 0.25


def exact_lm_brier_1(model, blocks) -> float:
    """Brier-1 of a next-token LM from its exact probabilities: the mean over every predicted position
    of 2·p(y) − Σ p² (float64), independent of the sampling estimator the evaluation uses."""
    import torch
    import torch.nn.functional as F

    scores = []
    with torch.no_grad():
        for b in blocks:
            b = b if b.dim() == 2 else b[None]
            p = F.softmax(model.logits(b)[:, :-1].double(), -1)
            scores.append((2 * p.gather(-1, b[:, 1:, None]).squeeze(-1) - p.square().sum(-1)).flatten())
    return float(torch.cat(scores).mean())


def reconstruction_accuracy(ae, blocks) -> float:
    """The share of tokens an autoencoder decodes back from its posterior mean (argmax), by hand."""
    import torch

    right = total = 0
    with torch.no_grad():
        for b in blocks:
            b = b if b.dim() == 2 else b[None]
            mu, _ = ae.encode(b)
            right += int((ae.decode(mu).argmax(-1) == b).sum())
            total += b.numel()
    return right / total
