"""export.example_outputs: the next graph's example inputs from a fake-tensor run, the real run only as a fallback."""
import torch
from torch._subclasses.fake_tensor import FakeTensor

from qvla_compiler.export import example_outputs


def test_example_outputs_come_from_a_fake_run_without_computing():
    seen, w = [], torch.randn(3, 5)

    def prefix(x):
        seen.append(type(x))
        return x @ w, (x > 0).sum(-1)

    out = example_outputs(prefix, (torch.randn(2, 3),))
    assert seen == [FakeTensor]  # run once, on fake tensors: nothing computed
    assert [(t.shape, t.dtype) for t in out] == [((2, 5), torch.float32), ((2,), torch.int64)]
    assert all(not t.any() for t in out) and not any(isinstance(t, FakeTensor) for t in out)


def test_example_outputs_fall_back_to_the_real_run():
    def no_fake_kernel(x):
        if isinstance(x, FakeTensor):
            raise NotImplementedError("no fake kernel")
        return (x * 2,)

    x = torch.randn(2, 3)
    assert torch.equal(example_outputs(no_fake_kernel, (x,))[0], x * 2)
    assert torch.equal(example_outputs(no_fake_kernel, (x,), lambda: (x * 3,))[0], x * 3)


def test_saving_a_quantized_policy_does_not_run_its_prefix(monkeypatch, tmp_path):
    """Program.export takes the denoise example from a fake run of the lowered prefix (qvla:: ops have fake
    kernels): the real run, which at full size costs minutes, is only the fallback."""
    from qvla_compiler.program import Program
    from policy_fixtures import quantized_policy

    _, qp = quantized_policy("pi05-tiny", "w8a8")
    monkeypatch.setattr(Program, "_run_prefix", lambda self, obs: (_ for _ in ()).throw(AssertionError("ran")))
    qp.save(tmp_path / "p.pt2")
