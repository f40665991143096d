"""GIF writer: float and quantized episodes side by side (Pillow)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from qvla_compiler.errors import QvlaError

__all__ = ["side_by_side_frames", "write_side_by_side_gif"]

_GREEN = np.array((40, 190, 60), dtype=np.uint8)
_RED = np.array((210, 40, 40), dtype=np.uint8)
_GREY = np.array((90, 90, 90), dtype=np.uint8)


def _check_frames(frames: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    if len(frames) == 0:
        raise QvlaError(f"{name} has no frames; run the episode with record_frames=True")
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise QvlaError(f"{name} frames must be uint8 [H,W,3], got {f.dtype} {f.shape}")
        out.append(f)
    return out


def side_by_side_frames(frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray],
                        success_a: bool | None = None, success_b: bool | None = None,
                        scale: int = 3, border: int = 2) -> list[np.ndarray]:
    """Compose frames [H', W', 3]: A left, B right, each framed in grey while
    running and, once its episode has ended, green (success) / red (failure).
    The shorter episode holds its last frame."""
    fa, fb = _check_frames(frames_a, "frames_a"), _check_frames(frames_b, "frames_b")
    if fa[0].shape != fb[0].shape:
        raise QvlaError(f"frame shapes differ: {fa[0].shape} vs {fb[0].shape}")
    n = max(len(fa), len(fb))
    out = []
    for t in range(n):
        panels = []
        for frames, ok in ((fa, success_a), (fb, success_b)):
            img = frames[min(t, len(frames) - 1)]
            img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
            ended = t >= len(frames) - 1
            colour = _GREY if (not ended or ok is None) else (_GREEN if ok else _RED)
            panels.append(np.pad(img, ((border, border), (border, border), (0, 0)), mode="constant"))
            panels[-1][:border, :] = colour
            panels[-1][-border:, :] = colour
            panels[-1][:, :border] = colour
            panels[-1][:, -border:] = colour
        gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
        out.append(np.concatenate([panels[0], gap, panels[1]], axis=1))
    return out


def write_side_by_side_gif(path: str, frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray],
                           labels: tuple[str, str] = ("float", "quantized"), caption: str | None = None,
                           success_a: bool | None = None, success_b: bool | None = None,
                           fps: float = 8.0, scale: int = 3) -> str:
    """Write an animated GIF comparing two episodes; returns ``path``."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QvlaError("writing GIFs needs Pillow: pip install pillow") from exc
    frames = side_by_side_frames(frames_a, frames_b, success_a, success_b, scale=scale)
    h, w = frames[0].shape[:2]
    header = 12 * (1 + (caption is not None))
    images = []
    for f in frames:
        canvas = Image.new("RGB", (w, h + header), (255, 255, 255))
        canvas.paste(Image.fromarray(f), (0, header))
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 0), labels[0], fill=(0, 0, 0))
        draw.text((w // 2 + 4, 0), labels[1], fill=(0, 0, 0))
        if caption is not None:
            draw.text((2, 12), caption[: max(1, w // 6)], fill=(0, 0, 0))
        images.append(canvas.convert("P", palette=Image.ADAPTIVE, colors=64))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, int(round(1000.0 / fps))), optimize=False)
    return path
