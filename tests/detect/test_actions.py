"""The arithmetic of the actions: clip factors and the re-run's relative difference, exactly."""

import math

import pytest
import torch

from spikeguard.detect.actions import clip_factor, relative_difference


@pytest.mark.parametrize(
    "flag, norm, band, expected",
    [
        (True, 8.0, 2.0, 0.25),  # flagged and over the band: scaled down to it
        (True, 1.5, 2.0, 1.0),  # flagged but already within the band
        (False, 8.0, 2.0, 1.0),  # not flagged: untouched
        (True, math.inf, 2.0, 1.0),  # non-finite: a skip's business, not a clip's
        (True, 8.0, math.inf, 1.0),  # no band yet (warm-up)
    ],
)
def test_clip_factor(flag, norm, band, expected):
    factor = clip_factor(torch.tensor(flag), torch.tensor(norm), torch.tensor(band, dtype=torch.float64))
    assert factor.dtype == torch.float32 and float(factor) == expected


def test_relative_difference_is_the_norm_of_the_difference_over_the_reference():
    b = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])]  # |b| = 5
    a = [torch.tensor([3.0, 1.0]), None]  # the second is missing: counts as zero
    # |a - b| = |(0, 1, 0, -4)| = sqrt(17)
    assert float(relative_difference(a, b)) == pytest.approx(math.sqrt(17) / 5, rel=1e-15)
    assert float(relative_difference(b, b)) == 0.0
