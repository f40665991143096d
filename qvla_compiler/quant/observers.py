"""Activation observers: identity modules that record what calibration needs about a linear's input."""
from __future__ import annotations

import torch
from torch import nn

from qvla_compiler.errors import CalibrationError
from qvla_compiler.quant.quantizers import mse_clip_scale
from qvla_compiler.quant.step_scales import per_step_scales, row_times

_SAMPLE_TOKENS = 256  # tokens kept from the first batch, for per-linear SQNR in the report
# Static scales: per call, this many |x| values drawn at random (seeded), plus as many tokens' peaks (|x| max, a
# strided subsample), so that rare large values are seen even when the draw misses them.
_VALUE_SAMPLES = 2048


class ActObserver(nn.Module):
    """Records per-channel absmax, a weighted sample of |x| (static scales), a small input sample, and optionally
    the input Hessian."""

    def __init__(self, consumers: str):
        super().__init__()
        self.consumers = consumers  # module paths of the linears reading this activation, for error messages
        self.calls = 0
        self.channel_absmax: torch.Tensor | None = None
        # per call: sampled |x| values, the weight of each (how many elements it stands for), and its flow time
        # (graphs with a time input; NaN where the time of a row is unknown)
        self.values: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
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
        mag = flat.abs()
        absmax = mag.amax(0)
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        times = None if t is None else row_times(x, t)
        if t is not None and times is None:  # tokens of several samples flattened together: the time is unknown
            times = flat.new_full((flat.shape[0],), float("nan"))
        self.values.append(self._sampled_values(mag, times))
        if self.sample is None:
            self.sample = flat[:_SAMPLE_TOKENS].clone()
            self.sample_time = None if t is None else float(t.reshape(-1)[0])  # its flow step (per-step scales)
        if self.track_hessian:
            self._accumulate_hessian(flat)
        self.calls += 1
        return x

    def _sampled_values(self, mag: torch.Tensor, times: torch.Tensor | None):
        """(|x| values, weights, times) of one call (mag = |x| [tokens, K]): a seeded random draw of elements, each
        standing for numel / draws, and a strided subsample of the tokens' peaks, each for `stride`; the peaks count
        once more than they occur (1/K of the mass), which leans the search towards clipping less."""
        peaks = mag.amax(1)
        stride = max(1, peaks.numel() // _VALUE_SAMPLES)
        draws = min(_VALUE_SAMPLES, mag.numel())
        pick = torch.randint(mag.numel(), (draws,), generator=torch.Generator().manual_seed(self.calls))
        values = torch.cat([mag.reshape(-1)[pick], peaks[::stride]])
        weights = torch.full_like(values, float(stride))
        weights[:draws] = mag.numel() / draws
        return values, weights, None if times is None else torch.cat([times[pick // mag.shape[1]], times[::stride]])

    def tensor_scale(self, qmax: int) -> torch.Tensor:
        """A static per-tensor scale, fp32 [1]: the clip that minimises the squared quantization error of the
        calibration values (quantizers.mse_clip_scale)."""
        self.require_data()
        return mse_clip_scale(*(torch.cat(part) for part in list(zip(*self.values))[:2]), qmax).reshape(1)

    def step_scales(self, qmax: int, bounds: torch.Tensor) -> torch.Tensor | None:
        """Static scales per flow-step bucket, fp32 [S] (step_scales.per_step_scales); None when this input had no
        flow time (dynamic scales)."""
        self.require_data()
        if any(t is None for _, _, t in self.values):
            return None
        values, weights, times = (torch.cat(part) for part in zip(*self.values))
        if times.isnan().any():
            raise CalibrationError(
                f"the input of {self.consumers} flattens the tokens of several samples together, so the flow step "
                "of a token is unknown and per-step scales cannot be calibrated; use act_mode 'static' or 'dynamic'")
        return per_step_scales(values, weights, times, bounds, qmax)

    def reset(self) -> None:
        """Forget every statistic (a second calibration pass sees transformed activations)."""
        self.calls, self.channel_absmax, self.values, self.sample = 0, None, [], None
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
