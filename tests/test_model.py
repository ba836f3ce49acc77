"""The backbone: masks, KV cache, adaLN-zero time conditioning."""

import pytest
import torch

from difflm.models import KVCache, Transformer, TransformerConfig


def _model(**kw):
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=20, max_len=32, n_layer=2, n_head=2, d_model=32, **kw))
    for p in m.parameters():  # move off the zero init so every path matters
        torch.nn.init.normal_(p, 0, 0.2)
    return m.eval()


def test_causal_mask_hides_the_future_and_bidirectional_does_not():
    x = torch.randint(0, 20, (2, 12))
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % 20
    c, b = _model(causal=True), _model(causal=False)
    assert torch.allclose(c(x)[:, :8], c(y)[:, :8], atol=1e-5) and not torch.allclose(c(x)[:, 8:], c(y)[:, 8:])
    assert not torch.allclose(b(x)[:, :8], b(y)[:, :8])


@pytest.mark.parametrize("capacity", [None, 16])
def test_kv_cache_matches_the_full_forward(capacity):
    m = _model(causal=True)
    x = torch.randint(0, 20, (3, 16))
    cache = KVCache(2, capacity)
    parts = [m(x[:, :5], cache=cache), m(x[:, 5:9], cache=cache)] + [m(x[:, i : i + 1], cache=cache)
                                                                       for i in range(9, 16)]
    assert torch.allclose(torch.cat(parts, 1), m(x), atol=1e-5)


def test_adaln_zero_starts_time_independent_then_uses_time():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=20, max_len=16, n_layer=2, n_head=2, d_model=32,
                                      time_conditioning=True)).eval()
    x = torch.randint(0, 20, (2, 8))
    torch.nn.init.normal_(m.head.weight, 0, 0.1)
    assert torch.allclose(m(x, torch.tensor([0.1, 0.1])), m(x, torch.tensor([0.9, 0.9])))  # zero-init gates
    torch.nn.init.normal_(m.blocks[0].ada.weight, 0, 0.1)
    assert not torch.allclose(m(x, torch.tensor([0.1, 0.1])), m(x, torch.tensor([0.9, 0.9])))
