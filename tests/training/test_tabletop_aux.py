"""The training-only grounding heads of training/tabletop_aux.py: patch indexing and a loss that can be learned."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "training"))

from tabletop_aux import (  # noqa: E402
    N_CLASSES, GroundingHeads, _patch_index, aux_loss, prefix_features, readout_features,
)

from qvla_compiler.models import build_policy  # noqa: E402


def test_patch_index_row_major_with_offsets():
    idx, off = _patch_index(torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.625, 0.375], [1.0, 1.0]]), 4)
    assert idx.tolist() == [0, 3, 12, 6, 15]
    torch.testing.assert_close(off[3], torch.tensor([0.0, 0.0]))
    assert (off.abs() <= 0.5).all()


def test_aux_loss_on_both_policies_backpropagates_and_scores_a_perfect_guess():
    torch.manual_seed(0)
    for name in ("pi05-tabletop", "groot-tabletop"):
        policy = build_policy(name, pretrained=False)
        obs = policy.example_inputs(batch=3)
        prefix = policy.embed_prefix(**obs)
        img, txt = prefix_features(policy, prefix, policy.config.max_tokens)
        assert img.shape[1] == policy.config.vision.num_patches and txt.shape[1] == policy.config.max_tokens
        read = readout_features(policy, prefix, policy.config.max_tokens)
        assert read.shape[:2] == txt.shape[:2]
        heads = GroundingHeads(img.shape[-1], read.shape[-1])
        landmarks = torch.rand(3, 2, 2)
        objects = torch.cat([torch.rand(3, 4, 2), torch.randint(0, N_CLASSES, (3, 4, 1)).float()], dim=-1)
        loss, stats = aux_loss(heads, img, txt, read, obs["token_mask"], landmarks, objects, torch.rand(3, 2), grid=4)
        loss.backward()
        assert torch.isfinite(loss) and 0.0 <= stats["ground_acc"] <= 1.0 and stats["coord_err"] > 0
        assert policy.vision.patch_embed.weight.grad.abs().sum() > 0
