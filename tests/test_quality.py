"""PSNR / SSIM of frame batches (the LiteFFN Compare node's math) on inputs with known answers."""
import math

import pytest
import torch

from liteffn.quality import metrics as Q


def frames(n=3, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, h, w, 3, generator=g)  # away from 0 and 1: noise never clips


def test_identical_frames_give_infinite_psnr_and_unit_ssim():
    a = frames()
    r = Q.compare(a, a.clone())
    assert all(math.isinf(p) for p in r["psnr"]) and math.isinf(r["psnr_all"])
    assert r["ssim"] == pytest.approx([1.0] * 3, abs=1e-12) and Q.fmt_db(r["psnr_all"]) == "inf (identical)"


@pytest.mark.parametrize("sigma,db", [(0.01, 40.0), (0.1, 20.0)])
def test_known_noise_level_gives_expected_psnr(sigma, db):
    a = frames(n=2, h=128, w=128)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)) * sigma
    r = Q.compare(a, a + noise)
    assert r["psnr"] == pytest.approx([db, db], abs=0.05)  # 10 log10(1 / sigma^2)
    assert 0 < r["ssim_all"] < 1


def test_ssim_of_flat_frames_matches_the_closed_form():
    # variances are zero, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1)
    a, b = torch.full((1, 16, 16, 1), 0.3), torch.full((1, 16, 16, 1), 0.5)
    x, y, c1 = float(a[0, 0, 0, 0]), 0.5, 0.01**2  # x: 0.3 as stored in fp32
    assert Q.ssim(a, b)[0] == pytest.approx((2 * x * y + c1) / (x**2 + y**2 + c1), rel=1e-9)


def test_one_bad_frame_shows_in_its_own_value():
    a = frames(n=4)
    b = a.clone()
    b[2] = 1 - b[2]
    p = Q.psnr(a, b)
    assert math.isinf(p[0]) and math.isinf(p[3]) and p[2] < 20


def test_mismatched_batches_are_explained():
    with pytest.raises(ValueError, match="same size and count"):
        Q.compare(frames(n=3), frames(n=2))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        Q.ssim(frames(h=8, w=8), frames(h=8, w=8))


def test_plot_shows_the_worst_frame_pair_above_the_curve():
    pytest.importorskip("PIL")
    from liteffn.quality.plot import render

    a = frames(n=4, h=32, w=40)
    b = a.clone()
    b[1] = 0.0  # the worst frame: black in the test half of the picture
    img = render(a, b, Q.compare(a, b), "r=64")
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[2] == 320 and img.shape[1] > 32 + 150
    torch.testing.assert_close(img[0, :32, :40], a[1], atol=1 / 255, rtol=0)  # reference frame 1, left
    assert img[0, :32, 40:80].max() == 0  # test frame 1, right
    same = render(a, a, Q.compare(a, a))  # all frames identical: still a picture
    assert torch.isfinite(same).all()
