"""What quantize treats as a policy (VLAPolicy, member by member), never-silent report warnings, input roles."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import qvla_compiler
from qvla_compiler import api
from qvla_compiler.passes.assign_regions import InputRoleWarning
from qvla_compiler.models import build_policy
from qvla_compiler.protocol import REQUIRED, ProtocolError, VLAPolicy, is_policy, missing_members
from qvla_compiler.inspect.report import LinearReport, Report, collect_warnings


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class EmbedPrefixOnly(Plain):
    """Like lerobot's PI05Pytorch: it has an embed_prefix, but it is not a qvla policy."""

    def embed_prefix(self, *args):
        return args


class HalfPolicy(EmbedPrefixOnly):
    def denoise_step(self, prefix, x_t, t):
        return x_t

    schedule = object()


def test_reference_policy_satisfies_the_protocol():
    policy = build_policy("pi05-tiny")
    assert isinstance(policy, VLAPolicy) and is_policy(policy, need_calibration=True)
    assert missing_members(policy) == []


def test_module_with_only_embed_prefix_is_a_plain_module():
    x = torch.randn(2, 8)
    assert not is_policy(EmbedPrefixOnly())
    qp = qvla_compiler.quantize(EmbedPrefixOnly(), (x,), [(x,)], recipe="w8a8", layout="all", progress=False)
    assert not qp.program.is_policy and qp.report.int_linears == 2


def test_half_policy_raises_a_protocol_error_naming_what_is_missing():
    with pytest.raises(ProtocolError, match="lacks example_noise, sample_actions") as err:
        qvla_compiler.quantize(HalfPolicy(), {"images": torch.randn(1, 3)}, [], recipe="w8a8", progress=False)
    assert isinstance(err.value, TypeError) and "fix:" in str(err.value)
    assert "schedule" not in str(err.value).split("lacks")[1].split(":")[0]  # it has one
    assert [name for name, _ in REQUIRED] == ["embed_prefix", "denoise_step", "schedule", "example_noise",
                                              "sample_actions"]


def test_calibration_batches_is_required_only_without_calib():
    class NoCalib(HalfPolicy):
        def example_noise(self, batch, seed=0):
            return torch.zeros(batch, 2)

        def sample_actions(self, *obs, noise):
            return noise

    assert is_policy(NoCalib())
    with pytest.raises(ProtocolError, match="(?s)lacks calibration_batches.*pass calib="):
        is_policy(NoCalib(), need_calibration=True)


def test_input_roles_reach_capture_module(monkeypatch):
    seen = {}
    real = api.capture_module

    def spy(module, args, **kw):
        seen.update(kw)
        return real(module, args)

    monkeypatch.setattr(api, "capture_module", spy)
    x = torch.randn(2, 8)
    qvla_compiler.quantize(Plain(), (x,), [(x,)], recipe="w8a8", layout="all", progress=False,
                           input_roles={"x": "state"})
    assert seen == {"input_roles": {"x": "state"}}


def test_input_roles_decide_the_region_of_a_plain_module():
    x = torch.randn(2, 8)
    qp = qvla_compiler.quantize(Plain(), (x,), [(x,)], recipe="w8a8", layout="all", progress=False,
                                input_roles={"x": "action"})
    assert {r.region for r in qp.report.linears} == {"action_head"}


class CrossAttentionOnly(nn.Module):
    """A head conditioned only by cross-attention: backbone features in, and no linear reads an action or time input
    (its timestep only masks the output)."""

    def __init__(self):
        super().__init__()
        self.block = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)

    def forward(self, hidden_states, encoder_hidden_states, timestep):  # a time input that reaches no linear
        return self.block(hidden_states, encoder_hidden_states) * (timestep[:, None, None] >= 0)


def test_backbone_features_without_an_action_input_warn_and_input_roles_settle_it():
    args = (torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.rand(2))
    with pytest.warns(InputRoleWarning, match="none of its attention / MLP linears depends on an input tagged action"):
        qp = qvla_compiler.quantize(CrossAttentionOnly().eval(), args, [args], recipe="w8a8", progress=False)
    assert any("input_roles" in w for w in qp.report.warnings) and qp.report.int_linears == 7  # attention too
    qp = qvla_compiler.quantize(CrossAttentionOnly().eval(), args, [args], recipe="w8a8", progress=False,
                                input_roles={"hidden_states": "action"})
    assert not qp.report.warnings and qp.report.int_linears == 2  # the head's MLP only


def test_layout_that_quantizes_nothing_warns_in_summary_and_json():
    x = torch.randn(2, 8)
    qp = qvla_compiler.quantize(Plain(), (x,), [(x,)], recipe="w8a8", layout="quantvla", progress=False)
    warnings = qp.report.summary()["warnings"]
    assert qp.report.int_linears == 0 and len(warnings) == 2
    assert "quantized 0 of 2 linears" in warnings[0] and "no attention or MLP block" in warnings[1]
    again = Report.from_json(qp.report.to_json())
    assert again.warnings == qp.report.warnings and again.linears == qp.report.linears
    everything = qvla_compiler.quantize(Plain(), (x,), [(x,)], recipe="w8a8", layout="all", progress=False)
    assert everything.report.int_linears == 2 and not everything.report.warnings  # roles decide nothing there


def test_report_json_without_the_newer_fields_still_loads():
    row = LinearReport("forward", "fc1", "backbone", "mlp", "W8A8", 72, 144, 100, 40.0)
    report = Report("m", "w8a8", "all", (row,), 144, 100, 0.01, 40.0)
    data = json.loads(report.to_json())
    del data["warnings"]
    for r in data["linears"]:
        del r["reason"], r["call_site"]
    old = Report.from_json(json.dumps(data))
    assert old.warnings == () and old.linears == (row,) and old.linears[0].reason is None


def test_policy_whose_regions_collapse_to_one_warns():
    row = LinearReport("denoise", "a", "action_head", "mlp", "W8A8", 4, 8, 4, 40.0)
    rows = [row, dataclasses.replace(row, module_path="b")]
    assert any("region 'action_head'" in w for w in collect_warnings(rows, "quantvla", is_policy=True))
    assert collect_warnings(rows, "quantvla", is_policy=False) == ()
    assert collect_warnings([dataclasses.replace(row, bits="float")], "none", is_policy=False) == ()
