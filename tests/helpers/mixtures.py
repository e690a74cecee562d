"""A 2-d Gaussian mixture that the generative-head tests fit, and the energy distance they score a fit
by (tests/test_heads.py, tests/test_heads_alt.py)."""
import torch

MIX_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
MIX_STD = 0.35


def sample_mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    comp = torch.randint(0, 3, (n,), generator=gen)
    return MIX_MEANS[comp] + MIX_STD * torch.randn(n, 2, generator=gen)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared energy distance 2E‖A−B‖ − E‖A−A'‖ − E‖B−B'‖ between two sample sets."""
    def within(z):
        return torch.cdist(z, z).sum() / (z.shape[0] * (z.shape[0] - 1))
    return (2 * torch.cdist(a, b).mean() - within(a) - within(b)).item()
