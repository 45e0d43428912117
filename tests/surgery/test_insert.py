"""The insert pass on the real pretrained MiniLM: identity at zero init, counts, training, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgery.adapters import ACTIVATIONS, AdapterSpec, Bottleneck
from surgery.errors import SurgeryError
from surgery.insert import bottleneck_params, houlsby_params
from surgery.pipeline import adapt, open_model

L, D = 6, 384


def _outputs(captured, sizes=None, seed=0):
    tensors = captured.signature.examples(sizes or {"batch": 3, "seq": 24}, seed=seed, pad=True)
    with torch.no_grad():
        return captured.signature.call(captured.gm, tensors)


def test_zero_init_adapters_compute_the_base_model_exactly(minilm_base, minilm):
    before = _outputs(minilm_base)
    report = adapt(minilm, AdapterSpec("houlsby", r=8))
    minilm.gm.graph.lint()
    after = _outputs(minilm)
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    assert len(report.sites) == 12
    adapters = [n for n in minilm.gm.graph.nodes if n.op == "call_module" and n.target.startswith("adapters.")]
    assert len(adapters) == 12


def test_houlsby_count_is_the_seed_formula(minilm):
    report = adapt(minilm, AdapterSpec("houlsby", r=8))
    assert report.trainable == houlsby_params(L, D, 8) == 2 * L * (2 * D * 8 + D + 8) == 78_432
    base = sum(p.numel() for n, p in minilm.gm.named_parameters() if not n.startswith("adapters."))
    assert report.total == base + report.trainable


def test_pfeiffer_adapts_the_feed_forward_only(minilm):
    report = adapt(minilm, AdapterSpec("pfeiffer", r=16, activation="gelu"))
    assert [s.role for s in report.sites] == ["ffn_out"] * L
    assert report.trainable == L * bottleneck_params(D, 16)


def test_a_nonzero_adapter_changes_the_output(minilm_base, minilm):
    adapt(minilm, AdapterSpec("houlsby", r=8))
    with torch.no_grad():
        minilm.gm.get_submodule("adapters.encoder.layer.3.output.dense").up_w.normal_(0, 0.05)
    before, after = _outputs(minilm_base)[0], _outputs(minilm)[0]
    assert (before - after).abs().max() > 1e-3


def test_training_reaches_only_the_adapters(minilm):
    adapt(minilm, AdapterSpec("houlsby", r=8))
    named = dict(minilm.gm.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items() if not n.startswith("adapters.")}
    trainable = [p for p in minilm.gm.parameters() if p.requires_grad]
    assert {n for n, p in named.items() if p.requires_grad} == {n for n in named if n.startswith("adapters.")}
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    tensors = minilm.signature.examples({"batch": 4, "seq": 16}, seed=3)
    target = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        hidden = minilm.signature.call(minilm.gm, tensors)[0]
        loss = torch.nn.functional.mse_loss(hidden, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in named.items():
        if n in base:
            assert p.grad is None, n
            assert torch.equal(p, base[n]), n
    assert any(p.abs().sum() > 0 for n, p in named.items() if n.endswith("up_w"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), ">= 1"),
        (dict(r=-4), ">= 1"),
        (dict(method="prefix"), "unknown method"),
        (dict(activation="swish"), "unknown activation"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(SurgeryError, match=message):
        AdapterSpec(**kwargs)


@pytest.mark.parametrize("r", [D, D + 1])
def test_r_must_be_narrower_than_the_model(minilm, r):
    with pytest.raises(SurgeryError, match="narrower"):
        adapt(minilm, AdapterSpec(r=r))


# σ written out from its definition, independently of the adapters' table (which may call the same torch ops)
REFERENCE = {
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "tanh": lambda h: (torch.exp(2 * h) - 1) / (torch.exp(2 * h) + 1),
    "identity": lambda h: h,
}


def test_every_activation_has_a_reference():
    assert set(REFERENCE) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(REFERENCE))
def test_bottleneck_math(activation):
    """f(x) = x + W_up σ(W_down x + b_down) + b_up, with torch.nn.functional.linear over (out, in) weights."""
    g = torch.Generator().manual_seed(0)
    W_down, b_down = torch.randn(4, 16, generator=g), torch.randn(4, generator=g)  # (r, d), (r,)
    W_up, b_up = torch.randn(16, 4, generator=g) * 0.5, torch.randn(16, generator=g)  # (d, r), (d,)
    b = Bottleneck(16, 4, activation)
    b.load_state_dict({"down_w": W_down.T, "down_b": b_down, "up_w": W_up.T, "up_b": b_up})  # stored pre-transposed
    x = torch.randn(2, 5, 16, generator=g)
    expected = x + F.linear(REFERENCE[activation](F.linear(x, W_down, b_down)), W_up, b_up)
    torch.testing.assert_close(b(x), expected, rtol=1e-5, atol=1e-5)
    assert (b(x) - x).abs().max() > 0.1  # not the identity


def test_adapting_an_adapted_model_is_refused(tmp_path, minilm):
    from surgery.bundle import save_adapted

    spec = AdapterSpec(r=4)
    report = adapt(minilm, spec)
    save_adapted(tmp_path / "m.adapted.pt2", minilm, spec, report)
    with pytest.raises(SurgeryError, match="already adapted"):
        adapt(open_model(str(tmp_path / "m.adapted.pt2")), spec)
