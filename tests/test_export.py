"""export.example_outputs: the next graph's example inputs from a fake-tensor run, the real run only as a fallback."""
import pytest
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


class VmapPaddingMask(torch.nn.Module):
    """transformers' padding mask: `padding_mask[batch_idx, kv_idx]` indexed under vmap inside torch's
    TransformGetItemToIndex (an autograd.Function that export records as flat_apply), optionally in a bf16 autocast
    block as GR00T samples. torch.export's verifier rejected both ("function_const_func_spec0 is missing val")."""

    def __init__(self, autocast: bool):
        super().__init__()
        self.autocast, self.fc = autocast, torch.nn.Linear(8, 8)

    def forward(self, x, pad):
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            with TransformGetItemToIndex():
                keep = torch.vmap(lambda i: pad[i])(torch.arange(x.shape[0]))
            return self.fc(x) * keep[:, :, None]


@pytest.mark.parametrize("autocast", [False, True])
def test_masks_indexed_under_vmap_capture(autocast):
    from qvla_compiler.export import capture_module

    module, args = VmapPaddingMask(autocast).eval(), (torch.randn(2, 5, 8), torch.rand(2, 5) > 0.3)
    gm = capture_module(module, args, None, dynamic_batch=False)["forward"]
    with torch.no_grad():
        assert torch.equal(gm(*args), module(*args))
