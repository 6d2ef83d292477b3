"""Layer 1: AWQ's fold is exact without quantization (logits equal in float32), on the
families it folds into, and the scale search scores what it claims."""

import pytest
import torch

from sli.offline.awq import AWQFoldError, fold, scale_points, search_point

from conftest import tiny_config

FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def _model(model_type: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, layers=2, **kw)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms away from their initial value, so a wrong fold shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fold_without_quantization_keeps_the_logits(model_type):
    model = _model(model_type)
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    gen = torch.Generator().manual_seed(2)
    for layer in model.model.layers:
        for point in scale_points(model_type):
            width = layer.get_submodule(point.linears[0]).in_features
            s = torch.exp(0.5 * torch.randn(width, generator=gen))
            if point.prev.endswith("v_proj"):  # query heads reading one kv head share its scales
                hd = layer.self_attn.head_dim
                kv = layer.self_attn.v_proj.out_features // hd
                s = s.view(kv, -1, hd)[:, :1].expand(kv, width // (kv * hd), hd).reshape(-1)
            fold(layer, point, s)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-4


def test_search_scores_round_to_nearest_at_alpha_zero_and_never_does_worse():
    from cache.codecs import decode_tensor, get_codec

    model = _model("llama", seed=3)
    layer = model.model.layers[0]
    point = scale_points("llama")[2]  # post_attention_layernorm -> gate, up; scored on the MLP's output
    x = torch.randn(4, 16, 64) * torch.linspace(0.1, 4.0, 64)  # uneven channels: what AWQ is for
    x = layer.post_attention_layernorm(x).detach()

    def q(name, w):
        return decode_tensor(get_codec("int4_group").encode(w, group_size=16), torch.float32)

    before = {n: layer.get_submodule(n).weight.detach().clone() for n in point.linears}
    alpha, s, err, err0 = search_point(layer, point, x, q, lambda t: layer.mlp(t), grid=10, duo=False)
    assert all(torch.equal(layer.get_submodule(n).weight, w) for n, w in before.items())  # the search restores the weights
    with torch.no_grad():
        ref = layer.mlp(x)
        for n in point.linears:
            layer.get_submodule(n).weight.copy_(q(n, before[n]))
        rtn = float((layer.mlp(x) - ref).pow(2).mean())
    assert err0 == pytest.approx(rtn, rel=1e-5)  # alpha = 0: scales of one, plain round to nearest
    assert err <= err0 and 0 <= alpha < 1 and s.shape == (64,)
    _, s2, err2, _ = search_point(layer, point, x, q, lambda t: layer.mlp(t), grid=10, duo=True, group_size=16)
    assert err2 <= rtn * 1.5 and s2.shape == (64,)  # duo scaling (the default) searches its own grid


def test_an_architecture_that_cannot_be_folded_is_named():
    with pytest.raises(AWQFoldError, match="'phi3'.*gptq"):
        scale_points("phi3")
