"""Kept fraction and compression ratio (docs/design.md, "Compression ratio")."""

import pytest
import torch

from dms_flex import stats


def test_kept_fraction_counts_window_as_retained():
    w = 2
    ev = torch.tensor([[[True, False, True, True, True, True]]])
    # last token at index 5; far tokens are 0..2 (5 - t > 2): marked 0 and 2 are gone -> 4 of 6 kept
    assert torch.allclose(stats.kept_fraction(ev, w), torch.tensor([[4 / 6]]))
    # with lengths: row of 4 tokens -> last=3, far = {0}: 3 of 4 kept
    assert torch.allclose(stats.kept_fraction(ev, w, torch.tensor([4])), torch.tensor([[3 / 4]]))
    rep = stats.compression_report([torch.tensor([[0.25, 0.5]]), torch.tensor([[0.25, 0.0 + 0.125]])])
    assert rep.ratio == pytest.approx(1 / ((0.25 + 0.5 + 0.25 + 0.125) / 4))
    assert len(rep.per_layer_ratio) == 2 and "CR" in rep.format()
