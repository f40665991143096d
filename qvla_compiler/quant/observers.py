"""Activation observers: identity modules that record what calibration needs about a linear's input."""
from __future__ import annotations

import torch
from torch import nn

from qvla_compiler.errors import CalibrationError
from qvla_compiler.quant.step_scales import per_step_scales, row_times

_SAMPLE_TOKENS = 256  # tokens kept from the first batch, for per-linear SQNR in the report
_TOKEN_STATS = 4096  # per-token absmax values kept (a strided subsample) for percentiles


class ActObserver(nn.Module):
    """Records per-channel absmax, tensor absmax, a subsample of per-token absmax and a small input sample."""

    def __init__(self, consumers: str):
        super().__init__()
        self.consumers = consumers  # module paths of the linears reading this activation, for error messages
        self.calls = 0
        self.channel_absmax: torch.Tensor | None = None
        self.token_absmax: list[torch.Tensor] = []
        self.token_time: list[torch.Tensor] = []  # flow time of each kept token (graphs with a time input)
        self.sample: torch.Tensor | None = None
        self.sample_time: float | None = None
        # GPTQ: set track_hessian before calibration to accumulate H = Σ 2·xᵀx over tokens (one fp32 [K, K])
        self.track_hessian = False
        self.hessian: torch.Tensor | None = None
        self.hessian_tokens = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """`t`: the graph's flow-time input, when it has one (per-step scales, quant/step_scales.py)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if flat.numel() == 0:
            return x
        if not torch.isfinite(flat).all():
            raise CalibrationError(
                f"calibration produced NaN/Inf at the input of {self.consumers}; check the calibration data "
                "(normalisation, padding) and that the float model itself is finite on it")
        absmax = flat.abs().amax(0)
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        per_token = flat.abs().amax(1)
        stride = max(1, per_token.numel() // _TOKEN_STATS)
        self.token_absmax.append(per_token[::stride])
        if t is not None:
            times = row_times(x, t)
            self.token_time.append(times[::stride] if times is not None else torch.full_like(per_token[::stride],
                                                                                              float("nan")))
        if self.sample is None:
            self.sample = flat[:_SAMPLE_TOKENS].clone()
            self.sample_time = None if t is None else float(t.reshape(-1)[0])  # its flow step (per-step scales)
        if self.track_hessian:
            self._accumulate_hessian(flat)
        self.calls += 1
        return x

    def tensor_scale(self, qmax: int, percentile: float = 100.0) -> torch.Tensor:
        """A static per-tensor scale: the `percentile` of per-token absmax over calibration, / qmax."""
        self.require_data()
        values = torch.cat(self.token_absmax)
        top = values.max() if percentile >= 100 else torch.quantile(values, percentile / 100)
        return (top / qmax).clamp_min(1e-8).reshape(1)

    def step_scales(self, qmax: int, percentile: float, bounds: torch.Tensor) -> torch.Tensor | None:
        """Static scales per flow-step bucket, fp32 [S]; None when this input had no flow time (dynamic scales)."""
        self.require_data()
        if not self.token_time:
            return None
        times = torch.cat(self.token_time)
        if times.isnan().any():
            raise CalibrationError(
                f"the input of {self.consumers} flattens the tokens of several samples together, so the flow step "
                "of a token is unknown and per-step scales cannot be calibrated; use act_mode 'static' or 'dynamic'")
        return per_step_scales(torch.cat(self.token_absmax), times, bounds, qmax, percentile)

    def reset(self) -> None:
        """Forget every statistic (a second calibration pass sees transformed activations)."""
        self.calls, self.channel_absmax, self.token_absmax, self.token_time, self.sample = 0, None, [], [], None
        self.hessian, self.hessian_tokens = None, 0

    def _accumulate_hessian(self, flat: torch.Tensor) -> None:
        if self.hessian is None:
            self.hessian = flat.new_zeros(flat.shape[1], flat.shape[1])
        self.hessian.addmm_(flat.T, flat, alpha=2.0)
        self.hessian_tokens += flat.shape[0]

    def hessian_mean(self) -> torch.Tensor:
        """H = 2·XᵀX / n over every calibration token seen while `track_hessian` was on, fp32 [K, K] (for GPTQ)."""
        self.require_data()
        if self.hessian is None or self.hessian_tokens == 0:
            raise CalibrationError(
                f"no Hessian was recorded at the input of {self.consumers}; set track_hessian = True on the "
                "observer before running calibration")
        return self.hessian / self.hessian_tokens

    def require_data(self) -> None:
        if self.calls == 0:
            raise CalibrationError(
                f"no calibration batch reached the input of {self.consumers}; the calibration data never "
                "exercised this path (empty iterable, or inputs that skip it)")
