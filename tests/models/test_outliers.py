"""inject_outliers is function-preserving and does create 20-100x channels."""
import pytest
import torch

from qvla_compiler.models import build_policy
from qvla_compiler.models.outliers import inject_outliers


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_outliers_preserve_actions_and_create_large_channels(name):
    policy = build_policy(name)
    obs, noise = policy.example_inputs(), policy.example_noise()
    ref = policy.sample_actions(**obs, noise=noise)
    inject_outliers(policy, channels=4, scale=(20.0, 100.0))
    seen = {}

    def record(key):
        def hook(module, inputs, output):
            seen.setdefault(key, inputs[0].abs().flatten(0, -2).amax(0))  # returns None: output unchanged
        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in policy.named_modules()
             if k.endswith(("mlp.gate_proj", "mlp.down_proj"))]
    out = policy.sample_actions(**obs, noise=noise)
    for h in hooks:
        h.remove()
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    ratios = [float(v.max() / v.median()) for v in seen.values()]
    assert ratios and min(ratios) > 10 and max(ratios) > 20


def test_outliers_are_reproducible():
    a, b = inject_outliers(build_policy("pi05-tiny"), seed=3), inject_outliers(build_policy("pi05-tiny"), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
