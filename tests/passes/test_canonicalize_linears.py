"""canonicalize_linears on einsum spellings: a linear map of x by a parameter becomes aten.linear (same values up to
the GEMM's rounding); every other einsum is left as it is, and a product with a parameter left float warns."""
import re
import warnings

import pytest
import torch
from torch import nn

import qvla_compiler
from qvla_compiler.export import capture_module
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.canonicalize_linears import FloatProductWarning
import zoo_models as zm


class Einsum(nn.Module):
    def __init__(self, equation: str, weight_shape: tuple, weight_first: bool = False):
        super().__init__()
        self.equation, self.weight_first = equation, weight_first
        self.weight = nn.Parameter(torch.randn(weight_shape))

    def forward(self, x):
        operands = (self.weight, x) if self.weight_first else (x, self.weight)
        return torch.einsum(self.equation, *operands) + 1


LINEAR = [  # (equation, x shape, weight shape, weight first)
    ("btd,hd->bth", (2, 5, 8), (6, 8), False),
    ("hd,btd->bth", (2, 5, 8), (6, 8), True),
    ("BTD,NDH->BTNH", (2, 5, 8), (3, 8, 4), False),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8), False),  # two contracted letters
    ("BSD,CKDH->CBSKH", (2, 5, 8), (2, 3, 8, 4), False),  # output letters in another order
    ("...d,df->...f", (2, 3, 5, 8), (8, 7), False),
    ("b t d , d f -> b f t", (2, 5, 8), (8, 7), False),  # spaces; features before a batch letter
]
NOT_LINEAR = [
    ("btd,td->bt", (2, 5, 8), (5, 8)),  # t is shared with the weight and kept: a batched product
    ("btd,dh->bt", (2, 5, 8), (8, 6)),  # a weight letter summed away
    ("bdd,de->be", (2, 8, 8), (8, 6)),  # a diagonal
    ("btd,d->bt", (2, 5, 8), (8,)),  # no feature letter
]


def _captured(module, x):
    torch.manual_seed(0)
    return capture_module(module.eval(), (x,), None, dynamic_batch=False)["forward"]


@pytest.mark.parametrize("equation, x_shape, w_shape, weight_first", LINEAR)
def test_an_einsum_linear_becomes_aten_linear(equation, x_shape, w_shape, weight_first):
    torch.manual_seed(0)
    module, x = Einsum(equation, w_shape, weight_first), torch.randn(x_shape)
    gm = _captured(module, x)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert g.aten.einsum.default not in ops and ops.count(g.LINEAR) == 1
    assert gm.graph.find_nodes(op="get_attr")[0].meta["val"].dim() == 2  # the weight folded to [features, contracted]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, x_shape, w_shape", NOT_LINEAR)
def test_an_einsum_that_is_not_a_linear_map_is_left_alone(equation, x_shape, w_shape):
    module, x = Einsum(equation, w_shape), torch.randn(x_shape)
    with pytest.warns(FloatProductWarning, match="einsum"):
        gm = _captured(module, x)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert g.aten.einsum.default in ops and g.LINEAR not in ops
    with torch.no_grad():
        assert torch.equal(gm(x), module(x))


class BatchedExperts(nn.Module):
    """Experts stacked in one parameter [E, in, out] and applied with bmm (GPT-OSS): one linear per expert."""

    def __init__(self, experts=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, 8, 6))

    def forward(self, x):
        return torch.bmm(x.expand(self.w.shape[0], -1, -1), self.w).sum(0)


def test_stacked_experts_become_one_linear_each():
    module, x = BatchedExperts(), torch.randn(1, 5, 8)
    gm = _captured(module, x)
    assert len(g.linear_nodes(gm)) == 3 and g.aten.bmm.default not in [n.target for n in gm.graph.nodes]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


def test_a_product_with_a_parameter_left_float_warns():
    with pytest.warns(FloatProductWarning, match=r"1 product\(s\) with a parameter .* einsum.default\(weight\)"):
        gm = _captured(Einsum("btd,dh->bt", (8, 6)), torch.randn(2, 5, 8))
    assert not g.linear_nodes(gm)


class LowRank(nn.Module):
    """A weight computed as a product of two parameters (a merged low-rank factorisation): a weight, not a product
    of x, so no warning, and the linear it feeds is folded and quantized like any other."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(8, 2)), nn.Parameter(torch.randn(2, 8))

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.einsum("or,ri->oi", self.a, self.b))


class RopeFromPositions(nn.Module):
    """lerobot's π0.5 expert: RoPE angles `inv_freq @ positions` with positions from the input's mask (a buffer
    times an input: a product, but no weight in it, so no warning; it used to warn)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4), persistent=False)

    def forward(self, x):
        positions = (x[..., 0] > 0).long().cumsum(-1).float()[:, None, :]
        freqs = (self.inv_freq[None, :, None].expand(x.shape[0], -1, 1) @ positions).transpose(1, 2)
        return x * torch.cat((freqs, freqs), dim=-1).cos()


def test_attention_products_and_weight_products_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatProductWarning)
        _captured(RopeFromPositions(), torch.randn(2, 5, 8))
        assert len(g.linear_nodes(_captured(LowRank(), torch.randn(2, 5, 8)))) == 1
        _captured(Einsum("btd,hd->bth", (6, 8)), torch.randn(2, 5, 8))
        _captured(zm.TorchMHA(), torch.randn(2, zm.T, zm.W))
        _captured(zm.EinsumProjections(), torch.randn(2, zm.T, zm.W))


class BroadcastExperts(nn.Module):
    """x [1, M, K] broadcast against a stack of 3 weights: not one x per expert, so left as a product (warned)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6))

    def forward(self, x):
        return torch.matmul(x[:1], self.w).sum(0)


def test_a_stack_broadcast_against_one_input_is_left_alone():
    module, x = BroadcastExperts(), torch.randn(2, 5, 8)
    with pytest.warns(FloatProductWarning):
        gm = _captured(module, x)
    with torch.no_grad():
        assert torch.equal(gm(x), module(x))


class CategorySpecific(nn.Module):
    """GR00T's per-embodiment linear: the weight picked from a stack by an input id, then bmm. It depends on the
    input, so it cannot be a stored integer weight: float, with a warning (it was silent)."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(3, 8, 8)), nn.Parameter(torch.zeros(3, 8))

    def forward(self, x, cat_ids):
        return torch.bmm(x, self.W[cat_ids]) + self.b[cat_ids].unsqueeze(1)


class DomainAware(nn.Module):
    """X-VLA's per-domain linear: the weight is an nn.Embedding row viewed as a matrix (it was silent)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Embedding(3, 64)

    def forward(self, x, cat_ids):
        return torch.matmul(x, self.fc(cat_ids).view(-1, 8, 8))


@pytest.mark.parametrize("cls, op, weight", [(CategorySpecific, "bmm", "W"), (DomainAware, "matmul", "fc.weight")])
def test_a_weight_indexed_by_an_input_warns_and_the_report_says_so(cls, op, weight):
    module, args = cls().eval(), (torch.randn(2, 5, 8), torch.tensor([0, 2]))
    with pytest.warns(FloatProductWarning, match=re.escape(f"{op}.default({weight}[index])")):
        capture_module(module, args, None, dynamic_batch=False)
    with pytest.warns(FloatProductWarning):
        qp = qvla_compiler.quantize(module, args, [args], "w8a8", layout="all", progress=False)
    assert any(f"{weight}[index]" in w for w in qp.report.warnings) and f"{weight}[index]" in qp.report.to_json()


class ConstantProducts(nn.Module):
    """Products of two constants beside a real linear: transformers' Llama / Qwen3 RoPE computes its angles as
    `inv_freq[None, :, None].expand(1, -1, 1) @ positions[:, None, :]` (a buffer times an arange; positions are
    [1, T] whatever the batch), and a merged
    low-rank weight `A @ B`. Neither is a layer: x reads no graph input. The RoPE one used to become a linear on
    the buffer with the arange as its weight, and capture then crashed folding a weight that reads no parameter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)
        self.a, self.b = nn.Parameter(torch.randn(8, 2)), nn.Parameter(torch.randn(2, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        positions = torch.arange(x.shape[1])[None].float()
        freqs = (self.inv_freq[None, :, None].expand(positions.shape[0], -1, 1) @ positions[:, None, :]).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return self.proj(x * angles.cos()) @ (self.a @ self.b)


def test_products_of_two_constants_are_not_linears():
    module, x = ConstantProducts().eval(), torch.randn(2, 5, 8)
    gm = _captured(module, x)
    linears = g.linear_nodes(gm)  # proj, and `(...) @ (a @ b)` (x from the input; its weight a @ b folded)
    assert len(linears) == 2 and all(any(n.op == "placeholder" for n in g.ancestors(lin.args[0])) for lin in linears)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


@torch.library.custom_op("qvla_test::experts_mm", mutates_args=())
def _experts_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip([0, *offsets[:-1].tolist()], offsets.tolist()))])


@_experts_mm.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-1])


class CustomOpExperts(nn.Module):
    """transformers 5's MoE experts (`grouped_mm_fallback`): tokens grouped by expert through an op qvla cannot see
    into, with the 3-D expert weight as an argument. The experts stayed float without a word."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 6))

    def forward(self, x):
        return _experts_mm(x, self.gate_up_proj, torch.tensor([3, 5]))


def test_a_custom_op_reading_a_weight_warns_with_the_parameter_name():
    with pytest.warns(FloatProductWarning, match=r"experts_mm.default\(gate_up_proj\)"):
        _captured(CustomOpExperts(), torch.randn(5, 8))
