"""triton_quantize_act vs its pure-torch reference: bit-exact q and scale on awkward shapes (interpreter on CPU)."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from qvla_compiler.errors import ShapeError  # noqa: E402
from qvla_compiler.kernels import triton_quantize_act as qa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3.0
    x[..., 0] += 11.0  # an outlier channel, as in real activations
    return x.to(dtype).to(DEVICE)


def _assert_same(got, want):
    q, s = got
    q_ref, s_ref = want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref.to(s.device), rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref.to(q.device), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 3, 17, 50])
@pytest.mark.parametrize("k", [7, 300])
@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_matches_ref(m, k, bits):
    dtype = _DTYPES[(m + k + bits) % 3]
    x = _rand(m, k, dtype=dtype, seed=m * k + bits)
    _assert_same(qa.quantize_act(x, bits), qa.quantize_act_ref(x, bits))


def test_two_pass_path_for_long_rows(monkeypatch):
    monkeypatch.setattr(qa, "_MAX_SINGLE_PASS_K", 64)  # rows wider than this loop twice over K
    x = _rand(3, 2500, dtype=torch.bfloat16, seed=5)
    _assert_same(qa.quantize_act(x, 8), qa.quantize_act_ref(x, 8))


def test_three_d_input_and_zero_row():
    x = _rand(2, 5, 33, seed=7)
    x[1, 2] = 0.0  # all-zero token: scale clamps to 1e-8, q = 0
    got = qa.quantize_act(x, 8)
    _assert_same(got, qa.quantize_act_ref(x, 8))
    assert got[1].shape == (2, 5, 1) and got[1][1, 2, 0].item() == pytest.approx(1e-8)


def test_round_half_to_even():
    # absmax 127 -> scale exactly 1, so x / scale keeps the .5 ties: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0
    x = torch.tensor([[127.0, 2.5, 3.5, -0.5, -1.5, 126.5, 0.49999997]], device=DEVICE)
    q, s = qa.quantize_act(x, 8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 2, 4, 0, -2, 126, 0]]


@pytest.mark.parametrize("bits", [8, 4])
def test_static_scale(bits):
    x = _rand(17, 40, dtype=torch.float16, seed=11)
    scalar = torch.tensor(0.05, device=DEVICE)  # small: many values clamp at +-qmax
    _assert_same(qa.quantize_act(x, bits, scalar), qa.quantize_act_ref(x, bits, scalar))
    per_token = (torch.rand(17, 1, generator=torch.Generator().manual_seed(3)) + 0.1).to(DEVICE)
    _assert_same(qa.quantize_act(x, bits, per_token), qa.quantize_act_ref(x, bits, per_token))


@pytest.mark.parametrize("k", [9, 64])
def test_packed_int4_output(k):
    x = _rand(3, k, dtype=torch.bfloat16, seed=k)
    q_packed, s = qa.quantize_act_packed_int4(x)
    q_ref, s_ref = qa.quantize_act_ref(x, 4)
    assert q_packed.shape == (3, (k + 1) // 2)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q_packed.cpu(), qa.pack_int4_ref(q_ref.cpu()), rtol=0, atol=0)
    torch.testing.assert_close(qa.unpack_int4_ref(q_packed.cpu(), k), q_ref.cpu(), rtol=0, atol=0)


def test_matches_cpu_op():
    ops = pytest.importorskip("qvla_compiler.kernels.ops", reason="qvla::quantize_act not defined yet")
    x = _rand(17, 100, dtype=torch.bfloat16, seed=23)
    for bits in (8, 4):
        want = ops.quantize_act(x.cpu(), bits, None)
        _assert_same(qa.quantize_act(x, bits), want)


@pytest.mark.parametrize("bad", ["bits", "dtype", "static_shape", "empty_k"])
def test_shape_errors(bad):
    x = _rand(4, 8)
    with pytest.raises(ShapeError):
        if bad == "bits":
            qa.quantize_act(x, 5)
        elif bad == "dtype":
            qa.quantize_act(x.to(torch.int32), 8)
        elif bad == "static_shape":
            qa.quantize_act(x, 8, torch.ones(3, 1, device=DEVICE))
        else:
            qa.quantize_act(x[:, :0], 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only check of the autotuned kernel)")
def test_gpu_large_rows_bit_exact():
    for k in (2048, 16384):
        x = _rand(800, k, dtype=torch.bfloat16, seed=k)
        for bits in (8, 4):
            _assert_same(qa.quantize_act(x, bits), qa.quantize_act_ref(x, bits))
