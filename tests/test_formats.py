import pytest
import torch

from liteffn.kernels import formats as F


def test_e2m1_codes_round_trip_every_value():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = F.e2m1_decode(codes)
    assert F.e2m1_encode(vals)[codes != 8].tolist() == codes[codes != 8].tolist()  # -0 encodes as +0
    assert sorted(set(vals.abs().tolist())) == list(F.E2M1_VALUES)


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -0.8, -2.6])
    want = [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -3.0]
    assert F.round_fp4(x).tolist() == want


def test_fp4_pack_unpack_exact_on_representable_values():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (37, 64), generator=g, dtype=torch.uint8)
    packed = F.pack_fp4(codes)
    assert packed.shape == (37, 32) and packed.dtype == torch.uint8
    assert torch.equal(F.unpack_fp4(packed), codes)
    assert packed[0, 0] == (codes[0, 0] | (codes[0, 1] << 4))  # element 2i in the low nibble
    vals = F.e2m1_decode(codes)
    assert torch.equal(F.e2m1_decode(F.unpack_fp4(F.pack_fp4(F.e2m1_encode(vals)))), vals)


def test_pack_needs_even_width():
    with pytest.raises(ValueError, match="even"):
        F.pack_fp4(torch.zeros(2, 3, dtype=torch.uint8))


def test_fp8_rounding_saturates_instead_of_nan():
    x = torch.tensor([1000.0, -1e6, 448.0, 0.0])
    assert F.round_fp8(x).tolist() == [448.0, -448.0, 448.0, 0.0]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_block_format_encode_decode_exact(fmt):
    g = torch.Generator().manual_seed(1)
    n, k, blk = 8, 64, F.BLOCK[fmt]
    grid = F.e2m1_decode(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    if fmt == "mxfp4":
        scale = torch.exp2(torch.randint(-10, 10, (n, k // blk), generator=g).float())
        ts = None
    else:
        ts = torch.tensor(0.01)
        scale = F.round_fp8(torch.rand(n, k // blk, generator=g) * 100 + 1) * ts
    t = F.encode(fmt, grid, scale, ts)
    want = (grid.view(n, -1, blk) * scale[:, :, None]).view(n, k)
    torch.testing.assert_close(F.decode(fmt, t), want, rtol=1e-6, atol=0)
    assert t["q"].shape == (n, k // 2)


def test_fp8_per_channel_beats_per_tensor_on_rows_of_different_magnitude():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 256, generator=g) * torch.logspace(-6, 0, 64)[:, None]
    s_row = W.abs().amax(1, keepdim=True) / F.FP8_MAX
    s_all = W.abs().amax() / F.FP8_MAX
    err_row = (F.round_fp8(W / s_row) * s_row - W).norm(dim=1) / W.norm(dim=1)
    err_all = (F.round_fp8(W / s_all) * s_all - W).norm(dim=1) / W.norm(dim=1)
    assert err_row.max() < 0.05
    assert err_all[:8].mean() > 5 * err_row[:8].mean()  # small rows drown in one tensor scale


def test_act_quant_per_token():
    x = torch.randn(5, 128) * torch.tensor([1e-3, 1, 10, 100, 1e4])[:, None]
    q, s = F.quantize_act_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    rel = (q.float() * s - x).norm(dim=1) / x.norm(dim=1)
    assert rel.max() < 0.05


# ---------------------------------------------------------------- the registry
def _on_grid(f, n, k, g):
    """Random values on format f's grid, and scales of the kind it stores, chosen by f itself."""
    grid = f.round(torch.randn(n, k, generator=g) * 4)
    ts = f.tensor_scale_for(torch.tensor(50.0))
    if f.block is None:
        scale = f.init_scales(torch.randn(n, k, generator=g))  # per row, or None
    else:
        scale = f.block_scale(torch.rand(n, k // f.block, generator=g) * 50 + 1e-3, ts)
    return grid, scale, ts


@pytest.mark.parametrize("name", list(F.FORMATS))
def test_every_format_round_trips_on_its_grid(name):
    f = F.get(name)
    assert f.name == name and F.check_format(name) == name and F.get(f) is f
    n, k = 8, 64
    grid, scale, ts = _on_grid(f, n, k, torch.Generator().manual_seed(3))
    assert torch.equal(f.round(grid), grid)
    t = f.encode(grid, scale, ts)
    assert tuple(t) == f.tensor_names and ("q_scale2" in t) == f.tensor_scale
    assert f.in_features(t) == k and t["q"].element_size() * t["q"].numel() * 8 == n * k * f.bits
    torch.testing.assert_close(f.decode(t), f.apply_scale(grid, scale), rtol=1e-6, atol=0)
    assert torch.equal(F.decode(name, F.encode(name, grid, scale, ts)), f.decode(t))  # the by-name wrappers


def test_registry_order_and_old_tables():
    assert list(F.FORMATS) == ["fp8", "nvfp4", "mxfp4", "bf16"]
    assert dict(F.BLOCK) == {"fp8": None, "nvfp4": 16, "mxfp4": 32, "bf16": None}
    assert dict(F.ACT_QUANT) == {"fp8": True, "nvfp4": True, "mxfp4": True, "bf16": False}
    with pytest.raises(KeyError):
        F.BLOCK["fp16"]


@pytest.mark.parametrize("bad", ["fp16", "FP8", "", None])
def test_unknown_format_names_the_choices(bad):
    with pytest.raises(ValueError, match="fp8, nvfp4, mxfp4, bf16"):
        F.get(bad)
    with pytest.raises(ValueError, match="unknown residual format"):
        F.check_format(bad)


@pytest.mark.parametrize("name", [n for n, f in F.FORMATS.items() if f.block])
def test_block_scale_is_the_first_candidate(name):
    f = F.get(name)
    amax = torch.rand(64, generator=torch.Generator().manual_seed(4)) * 30
    ts = f.tensor_scale_for(amax.max())
    assert torch.equal(f.block_scale(amax, ts), f.scale_candidates(amax, ts)[0])
