"""transpose_float_weights: a float linear's weight, read by linears alone, becomes one contiguous [K, N] constant of
the compiled copy (the [N, K] one dropped); the values stay; weights anything else reads stay as they are."""
import torch

from qvla_compiler.kernels.inductor import compile_program
from qvla_compiler.lowering.transpose_float_weights import transpose_float_weights
from qvla_compiler.passes._graph import attr_tensor

aten = torch.ops.aten


class Block(torch.nn.Module):
    """A projection with a bias, one without, a weight two linears share, and a tied embedding / head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(12, 20), torch.nn.Linear(20, 12, bias=False)
        self.shared = torch.nn.Linear(12, 12)
        self.embed = torch.nn.Embedding(7, 12)

    def forward(self, ids, x):
        h = self.down(torch.relu(self.up(x + self.embed(ids))))
        h = self.shared(self.shared(h))
        return h @ self.embed.weight.t(), torch.nn.functional.linear(h, self.embed.weight)  # tied head


def _linears(gm):
    return gm.graph.find_nodes(op="call_function", target=aten.linear.default)


def _exported(ids, x):
    batch = torch.export.Dim("batch")
    return torch.export.export(Block(), (ids, x), dynamic_shapes=({0: batch}, {0: batch})).module()


def test_weights_only_linears_read_are_stored_transposed_with_the_same_values():
    ids, x = torch.randint(0, 7, (3, 5)), torch.randn(3, 5, 12)
    gm = _exported(ids, x)
    want = gm(ids, x)
    weights = {n.args[1].target: attr_tensor(gm, n.args[1].target) for n in _linears(gm)}
    assert transpose_float_weights(gm) == 4  # up, down, shared twice; the tied head's weight stays
    kept = _linears(gm)
    assert len(kept) == 1 and attr_tensor(gm, kept[0].args[1].target) is weights[kept[0].args[1].target]
    stored = {n.target: attr_tensor(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")}
    for name, w in weights.items():
        if name == kept[0].args[1].target:
            continue
        assert name not in stored  # replaced, not copied: the same bytes of weights
        transposed = stored[f"{name}_t"]
        assert transposed.is_contiguous() and torch.equal(transposed, w.t())
    got = gm(ids, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gm(ids[:2], x[:2])[0], want[0][:2], rtol=1e-6, atol=1e-6)


def test_the_compiled_copy_matches_and_the_saved_graph_keeps_its_linears():
    ids, x = torch.randint(0, 7, (2, 5)), torch.randn(2, 5, 12)
    gm = torch.export.export(Block(), (ids, x)).module()
    before = dict(gm.named_parameters())
    with torch.no_grad():
        want = gm(ids, x)
        compiled = compile_program(gm)
        got = compiled(ids, x)
    assert len(_linears(gm)) == 5 and len(_linears(compiled.module)) == 1
    assert dict(gm.named_parameters()) == before  # the copy dropped its own [N, K] weights, not the original's
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_weight_a_linear_reads_as_its_input_stays():
    class SelfProduct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return torch.nn.functional.linear(self.w, self.w).sum() + torch.nn.functional.linear(x, self.w)

    gm = torch.export.export(SelfProduct(), (torch.randn(2, 6),)).module()
    assert transpose_float_weights(gm) == 0 and len(_linears(gm)) == 2
