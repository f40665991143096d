"""precompute_factories: tensors made from static arguments alone become constants of the compiled copy, with the
same values, so Inductor's freezing folds what they feed; random, uninitialized and batch-sized ones stay."""
import torch

from qvla_compiler.kernels.inductor import compile_program
from qvla_compiler.lowering.precompute_factories import precompute_factories

aten = torch.ops.aten


class TimeTable(torch.nn.Module):
    """GR00T-like: a sinusoidal table of fixed timesteps through a linear, added to the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.freqs = torch.nn.Linear(16, 8), torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        t = torch.linspace(0.0, 1.0, 4)[:, None] * self.freqs
        table = self.proj(torch.cat([t.sin(), t.cos()], -1))  # [4, 8]
        mask = torch.ones(x.shape[0], 4, dtype=torch.bool)  # sized by the batch: stays
        noise = torch.randn(4, 8)  # random: stays
        scratch = torch.empty(4, 8)  # undefined contents: stays
        scaled = torch.full((4,), 2.0).mul_(x.mean())  # written in place: a constant would keep the write
        column = torch.zeros(4, 2)
        column[:, 0] = x.sum()  # written through a view
        return (x[:, :, None] + table).masked_fill(~mask[:, :, None], 0.0), noise, scratch, scaled, column


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_static_factories_become_constants_with_the_same_values():
    x = torch.randn(3, 4)
    gm = torch.export.export(TimeTable(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    want = gm(x)[0]
    assert precompute_factories(gm) == 1
    targets = _targets(gm)
    assert aten.linspace.default not in targets  # the table's timesteps: a constant now
    assert {aten.ones.default, aten.randn.default, aten.empty.memory_format, aten.full.default,
            aten.zeros.default} <= targets
    assert torch.equal(gm(x)[0], want) and torch.equal(gm(x[:2])[0], want[:2])
    y = torch.randn(3, 4)
    assert torch.equal(gm(y)[3], torch.full((4,), 2.0) * y.mean())  # not 2·mean(x)·mean(y)
    assert torch.equal(gm(y)[4][:, 0], y.sum().expand(4))


def test_the_compiled_copy_reads_the_constant_and_matches():
    x = torch.randn(3, 4)
    gm = torch.export.export(TimeTable(), (x,)).module()
    with torch.no_grad():
        want = gm(x)[0]
        compiled = compile_program(gm)
        got = compiled(x)[0]
    assert aten.linspace.default not in _targets(compiled.module) and aten.linspace.default in _targets(gm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
