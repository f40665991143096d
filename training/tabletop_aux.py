"""Auxiliary grounding losses for training the tabletop policies (training only; the heads are thrown away).

Real VLAs start from a pretrained vision-language backbone that already knows what is where in an image and which
object a phrase names. The tabletop policies start from random weights and have only ~30 CPU-minutes, so the
training script gives the backbone that knowledge directly, from the simulator's labels
(`qvla_compiler.eval.dataset.scene_labels`), next to the flow-matching loss:

* scene:  per image patch, which object (colour x shape, or none) has its centre there;
* ground: for the two landmarks of the instruction (what to go to now, what comes after it), a softmax over the image
  patches whose logits are <image-token feature, pooled instruction feature> (so the language side must name the
  object and the image side must show it), plus the landmark's offset inside its patch.

* coords: the two landmarks' and the agent's table coordinates, regressed linearly from the mean of the valid text
  tokens of exactly what the action head reads (pi0.5: the last layer's prefix values, which its expert attends to;
  GR00T: the `vlln` output its DiT cross-attends to), so that one attention read gives the head what to go to.

Scene and ground use the final prefix states (pi0.5's final norm, GR00T's `vlln`; image tokens first, then the text
tokens; GR00T's causal LM lets only the text tokens see the image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvla_compiler.eval.tabletop import COLOURS, SHAPES
from qvla_compiler.models.groot import GrootPolicy

N_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # 0 = no object centre in the patch
N_LANDMARKS = 2


def prefix_features(policy, prefix: tuple[Tensor, ...], n_tokens: int) -> tuple[Tensor, Tensor]:
    """(image-token features [B, P, W], text-token features [B, L, W]) from `embed_prefix`'s output."""
    hidden = prefix[0] if isinstance(policy, GrootPolicy) else prefix[3]
    p = policy.config.vision.num_patches
    return hidden[:, :p], hidden[:, p:p + n_tokens]


def readout_features(policy, prefix: tuple[Tensor, ...], n_tokens: int) -> Tensor:
    """Text-token features [B, L, D] as the action head reads them (pi0.5: last layer's values, D = head_dim)."""
    read = prefix[0] if isinstance(policy, GrootPolicy) else prefix[1][:, -1]
    p = policy.config.vision.num_patches
    return read[:, p:p + n_tokens]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class GroundingHeads(nn.Module):
    def __init__(self, width: int, read_dim: int, key_dim: int = 64):
        super().__init__()
        self.coords = nn.Linear(read_dim, 2 * N_LANDMARKS + 2)  # landmarks then agent, in [-1, 1]
        self.scene = nn.Linear(width, N_CLASSES)
        self.keys = nn.Linear(width, key_dim)
        self.queries = nn.Linear(width, N_LANDMARKS * key_dim)
        self.offsets = nn.Linear(width, N_LANDMARKS * 2)
        self.key_dim = key_dim

    def forward(self, img: Tensor, txt: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """scene logits [B, P, C], landmark logits [B, N_LANDMARKS, P], offsets [B, P, N_LANDMARKS, 2]."""
        q = self.queries(_masked_mean(txt, txt_mask)).unflatten(-1, (N_LANDMARKS, self.key_dim))
        logits = torch.einsum("bnd,bpd->bnp", q, self.keys(img)) * self.key_dim**-0.5
        return self.scene(img), logits, self.offsets(img).unflatten(-1, (N_LANDMARKS, 2))


def _patch_index(xy: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Row-major patch index of table positions xy [..., 2] (x = column, y = row) and the offset in the patch."""
    cell = (xy * grid).clamp(0.0, grid - 1e-4)
    rc = cell.floor()
    idx = (rc[..., 1] * grid + rc[..., 0]).long()
    return idx, cell - rc - 0.5


def aux_loss(heads: GroundingHeads, img: Tensor, txt: Tensor, read: Tensor, txt_mask: Tensor, landmarks: Tensor,
             objects: Tensor, agent: Tensor, grid: int) -> tuple[Tensor, dict[str, float]]:
    """Scene CE + landmark CE + landmark offset MSE + coordinate MSE; also the landmark patch accuracy and the
    coordinate error (table units).  `agent` [B, 2] is the agent position in table units."""
    scene, logits, offsets = heads(img, txt, txt_mask)
    b, p = scene.shape[:2]
    labels = torch.zeros(b, p, dtype=torch.long)
    present = objects[..., 2] > 0
    obj_idx, _ = _patch_index(objects[..., :2], grid)
    rows = torch.arange(b)[:, None].expand_as(obj_idx)
    labels[rows[present], obj_idx[present]] = objects[..., 2][present].long()
    lm_idx, lm_off = _patch_index(landmarks, grid)                     # [B, N], [B, N, 2]
    picked = offsets[torch.arange(b)[:, None], lm_idx, torch.arange(N_LANDMARKS)[None, :]]  # [B, N, 2]
    loss_scene = F.cross_entropy(scene.flatten(0, 1), labels.flatten())
    loss_ground = F.cross_entropy(logits.flatten(0, 1), lm_idx.flatten())
    loss_offset = F.mse_loss(picked, lm_off) * 4.0                      # offsets are in [-0.5, 0.5]
    want = torch.cat([landmarks.flatten(1), agent], dim=-1) * 2.0 - 1.0
    loss_coords = F.mse_loss(heads.coords(_masked_mean(read, txt_mask)), want) * 4.0
    acc = (logits.argmax(-1) == lm_idx).float().mean().item()
    return loss_scene + loss_ground + loss_offset + loss_coords, {
        "ground_acc": acc, "coord_err": 0.5 * loss_coords.item() ** 0.5 / 2.0}
