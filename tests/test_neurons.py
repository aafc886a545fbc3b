import pytest
import torch

from stata_deploy.nn.neurons import LIF, TernaryLIF, TokenIndex, lif_reference, multistep_neuron


def test_lif_hand_computed_sequence():
    # tau=2, V_th=1, V_reset=0: H = V + (X - V)/2
    x = torch.tensor([1.5, 1.5, 0.0, 2.0, 0.5, 0.5, 0.5]).reshape(7, 1)
    # t0: H=0.75 no spike V=0.75; t1: H=0.75+(1.5-0.75)/2=1.125 spike, V=0; t2: H=0; t3: H=1.0 spike (>=), V=0
    # t4: H=0.25; t5: H=0.25+(0.5-0.25)/2=0.375; t6: H=0.375+(0.5-0.375)/2=0.4375
    expected = torch.tensor([0, 1, 0, 1, 0, 0, 0], dtype=torch.float32).reshape(7, 1)
    assert torch.equal(LIF()(x), expected)
    assert torch.equal(lif_reference(x), expected)


def test_ternary_fires_both_signs():
    x = torch.tensor([2.5, -2.5, 0.1]).reshape(3, 1)
    out = TernaryLIF()(x)
    assert out.flatten().tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize("ternary", [False, True])
def test_custom_backward_matches_autograd_surrogate(ternary):
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 7) * 1.5).requires_grad_()
    w = torch.randn(5, 3, 7)
    (multistep_neuron(x, ternary=ternary) * w).sum().backward()
    g_custom = x.grad.clone()

    # autograd reference: straight-through with sigmoid surrogate, detached reset
    class Spike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u >= 0).float()

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            s = torch.sigmoid(4 * u)
            return g * 4 * s * (1 - s)

    x2 = x.detach().clone().requires_grad_()
    v = torch.zeros_like(x2[0])
    outs = []
    for t in range(5):
        h = v + (x2[t] - v) / 2
        s = Spike.apply(h - 1)
        if ternary:
            s = s - Spike.apply(-h - 1)
        v = h * (1 - s.detach().abs())
        outs.append(s)
    (torch.stack(outs) * w).sum().backward()
    assert torch.allclose(g_custom, x2.grad, atol=1e-6)


def test_indexed_state_decays_for_dropped_tokens():
    # one token, kept at t=0 and t=2, dropped at t=1: its membrane decays by (1 - 1/tau) at t=1
    x_full = torch.tensor([1.2, 0.0, 1.2]).reshape(3, 1, 1, 1)
    full = multistep_neuron(x_full)  # dropped == zero input at t=1
    idx = torch.tensor([0, 0, 0]).reshape(3, 1, 1)
    # two-token sequence where token 0 is kept at t=0,2 and token 1 at t=1
    x = torch.tensor([1.2, 5.0, 1.2]).reshape(3, 1, 1, 1)
    idx = torch.tensor([[0], [1], [0]]).reshape(3, 1, 1)
    out = multistep_neuron(x, index=TokenIndex(idx, 2, True))
    assert out[0].item() == full[0].item() and out[2].item() == full[2].item()
    assert out[1].item() == 1.0  # token 1 fires on its own input


def test_indexed_backward_matches_dense_equivalent():
    torch.manual_seed(1)
    T, B, N, k, D = 4, 2, 6, 3, 5
    idx = torch.stack([torch.stack([torch.randperm(N)[:k].sort().values for _ in range(B)]) for _ in range(T)])
    x = (torch.randn(T, B, k, D) * 2).requires_grad_()
    w = torch.randn(T, B, k, D)
    (multistep_neuron(x, index=TokenIndex(idx, N, True)) * w).sum().backward()
    # dense equivalent: scatter into the full sequence with zero input for dropped tokens
    x2 = x.detach().clone().requires_grad_()
    full = torch.zeros(T, B, N, D).scatter(2, idx.unsqueeze(-1).expand(T, B, k, D), x2)
    out_full = multistep_neuron(full)
    out = torch.gather(out_full, 2, idx.unsqueeze(-1).expand(T, B, k, D))
    (out * w).sum().backward()
    assert torch.equal(multistep_neuron(x.detach(), index=TokenIndex(idx, N, True)), out.detach())
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
