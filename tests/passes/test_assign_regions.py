"""assign_regions follows values, not shapes: with one dynamic batch for every input, torch.export reads the batch
size from one input (`sym_size(input_ids, 0)`) for every `reshape(B, ...)`, and that edge made a vision tower
backbone (transformers' PaliGemma / Idefics3: the default layout quantized their vision towers, silently)."""
import torch
from torch import nn

from qvla_compiler.export import capture_module
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes import assign_regions, classify_linears


class TextThenImage(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.t = nn.Embedding(64, 32), nn.Linear(32, 32)
        self.v1, self.v2 = nn.Linear(48, 32), nn.Linear(32, 32)

    def forward(self, input_ids, pixel_values):
        b = pixel_values.shape[0]
        x = self.v2(self.v1(pixel_values.reshape(b, 16, 48)).reshape(b, 16, 32))  # image only, B read from the text
        return self.t(self.emb(input_ids)).mean(1) + x.mean(1)


def test_a_reshape_sized_by_another_input_does_not_change_a_region():
    args = (torch.randint(0, 64, (2, 5)), torch.randn(2, 3, 16, 16))
    gm = capture_module(TextThenImage().eval(), args)["forward"]
    shape_reads = [n for n in gm.graph.nodes if n.target == torch.ops.aten.sym_size.int]
    assert shape_reads and {n.args[0].name for n in shape_reads} == {"input_ids"}  # the edge this test is about
    assign_regions(classify_linears(gm))
    regions = {n.meta["qvla"].module_path: n.meta["qvla"].region.value for n in g.linear_nodes(gm)}
    assert regions == {"v1": "vision", "v2": "vision", "t": "backbone"}


class ProbePooling(nn.Module):
    """SigLIP's pooling head: a learned probe attends over the image features (nn.MultiheadAttention). The probe's
    query reads no input; with only values followed it fell to backbone and the default layout quantized it."""

    def __init__(self):
        super().__init__()
        self.patch, self.probe = nn.Linear(48, 32), nn.Parameter(torch.randn(1, 1, 32))
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, pixel_values):
        h = self.patch(pixel_values.flatten(2).transpose(1, 2).reshape(pixel_values.shape[0], -1, 48))
        return self.attention(self.probe.expand(h.shape[0], -1, -1), h, h, need_weights=False)[0]


def test_a_learned_query_takes_the_region_of_what_it_attends_to():
    gm = capture_module(ProbePooling().eval(), (torch.randn(2, 3, 16, 16),))["forward"]
    assign_regions(classify_linears(gm))
    assert {n.meta["qvla"].region.value for n in g.linear_nodes(gm)} == {"vision"}


class CastCrossAttentionHead(nn.Module):
    """RDT / timm-EVA style: `q, k = q.type_as(v), k.type_as(v)` (v lends only a dtype), and a control-frequency token
    `full_like(t, 25.0)` (t lends only a shape). v_proj was attn_qkv (reached from q, k and v), its backbone region
    pulled the cross-attention K/V out of the head and the default layout quantized them. `freq` reads no input and
    is in the head because it feeds the head, not because of t's shape."""

    def __init__(self, d=32):
        super().__init__()
        self.inp, self.freq = nn.Linear(7, d), nn.Linear(1, d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x_t, t, encoder_hidden_states):
        x = self.inp(x_t) + t[:, None, None] + self.freq(torch.full_like(t, 25.0)[:, None, None])
        split = lambda z: z.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(encoder_hidden_states)), split(self.v(encoder_hidden_states))
        q, k = q.type_as(v), k.type_as(v)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_dtype_and_shape_donors_are_not_dataflow():
    args = (torch.randn(2, 8, 7), torch.rand(2), torch.randn(2, 12, 32))
    gm = capture_module(CastCrossAttentionHead().eval(), args)["forward"]
    assign_regions(classify_linears(gm))
    got = {n.meta["qvla"].module_path: (n.meta["qvla"].role.value, n.meta["qvla"].region.value)
           for n in g.linear_nodes(gm)}
    head = "action_head"
    assert got == {"inp": ("other", head), "freq": ("other", head), "q": ("attn_q", head),
                   "k": ("attn_k", head), "v": ("attn_v", head), "proj": ("attn_o", head), "fc1": ("mlp", head),
                   "fc2": ("mlp", head)}


class QFormer(nn.Module):
    """BLIP-2's Q-Former order: the learned queries first attend to each other (every linear of that block reads
    parameters only), then to the image. The self-attention block was backbone, quantized in an image-only module."""

    def __init__(self, d=32):
        super().__init__()
        self.patch, self.queries = nn.Linear(48, d), nn.Parameter(torch.randn(1, 4, d))
        self.self_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, pixel_values):
        img = self.patch(pixel_values.flatten(2).transpose(1, 2).reshape(pixel_values.shape[0], -1, 48))
        q = self.queries.expand(pixel_values.shape[0], -1, -1)
        q = q + self.self_attn(q, q, q, need_weights=False)[0]
        return q + self.cross_attn(q, img, img, need_weights=False)[0]


def test_linears_reading_only_parameters_take_the_region_they_feed():
    gm = capture_module(QFormer().eval(), (torch.randn(2, 3, 16, 16),))["forward"]
    assign_regions(classify_linears(gm))
    assert {n.meta["qvla"].region.value for n in g.linear_nodes(gm)} == {"vision"}
