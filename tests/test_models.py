import numpy as np
import pytest
import torch

from switchdit_dist.models.dit import DiT
from switchdit_dist.models.prior import (
    DiffusionPriorLoss,
    jensen_shannon,
    match_units,
    matching_cost,
    prior_table,
    topk_pattern,
)
from switchdit_dist.models.registry import build_model, model_config, parse_name
from switchdit_dist.models.switch_dit import SwitchDiT


def count_params(arch, size, **kw):
    with torch.device("meta"):
        model = build_model(model_config(arch, size, **kw))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "arch,size,expected",
    [
        ("dit", "S", 32_963_360),
        ("dit", "B", 130_512_416),
        ("dit", "XL", 675_129_632),
        ("switch-dit", "S", 38_299_460),
    ],
)
def test_parameter_counts_match_public_code(arch, size, expected):
    assert count_params(arch, size) == expected


def test_state_dict_keys_follow_dit():
    with torch.device("meta"):
        model = build_model(model_config("switch-dit", "S"))
    keys = set(model.state_dict())
    for key in [
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "pos_embed",
        "blocks.3.attn.qkv.weight",
        "blocks.3.attn.proj.weight",
        "blocks.3.mlp.fc1.weight",
        "blocks.3.mlp.fc2.weight",
        "blocks.3.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ]:
        assert key in keys, key


def tiny_pair(**switch_kw):
    common = dict(input_size=16, in_channels=2, num_classes=10)
    dit = DiT(model_config("dit", "tiny", **common))
    switch = SwitchDiT(model_config("switch-dit", "tiny", **common, **switch_kw))
    # Non-zero everywhere (zeroed adaLN / final layer would hide differences).
    torch.manual_seed(1)
    for p in dit.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    missing = switch.load_state_dict(dit.state_dict(), strict=False).missing_keys
    assert all(".router." in k or ".moe." in k for k in missing)
    return dit.eval(), switch.eval()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_switch_dit_at_init_equals_dit_bit_for_bit(kind):
    dit, switch = tiny_pair(expert_kind=kind, num_experts=4, top_k=2)
    x = torch.randn(5, 2, 16, 16)
    t = torch.tensor([0, 1, 250, 500, 999])
    y = torch.tensor([0, 3, 9, 10, 2])  # 10 = null class
    assert torch.equal(switch(x, t, y), dit(x, t, y))


def test_routing_is_per_sample_with_unnormalised_softmax_weights():
    _, switch = tiny_pair(num_experts=4, top_k=2)
    block = switch.blocks[0]
    torch.manual_seed(2)
    for p in block.moe.parameters():
        p.data.normal_(0, 0.1)
    t_emb = torch.randn(3, switch.config.hidden_size)
    probs, index, weight = block.router(t_emb)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.equal(weight, probs.gather(1, index))  # full probabilities, not renormalised
    assert (weight.sum(-1) < 1).all()
    # every token of a sample goes through the same experts: compare with a per-token reference
    x = torch.randn(3, 7, switch.config.hidden_size)
    out = block.moe(x, index, weight)
    for b in range(3):
        ref = sum(weight[b, j] * block.moe.experts[int(index[b, j])](x[b]) for j in range(2))
        torch.testing.assert_close(out[b], ref, rtol=1e-6, atol=1e-6)


def test_switch_block_matches_the_formula():
    _, switch = tiny_pair(num_experts=3, top_k=2)
    block = switch.blocks[1]
    torch.manual_seed(3)
    for p in block.parameters():
        p.data.normal_(0, 0.05)
    d = switch.config.hidden_size
    x, c, t_emb = torch.randn(2, 5, d), torch.randn(2, d), torch.randn(2, d)
    probs = torch.softmax(block.router.gate[1](torch.nn.functional.silu(t_emb)), -1)
    w, i = probs.topk(2, -1)
    out = torch.stack(
        [sum(w[b, j] * block.moe.experts[int(i[b, j])](x[b]) for j in range(2)) for b in range(2)]
    )
    m = 1 + out
    r = x * m
    r = block.residual_branches(r, c)
    expected = r + (1 - m) * x
    got, _ = block(x, c, t_emb)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_parse_name():
    assert parse_name("Switch-DiT-XL/2") == ("switch-dit", "XL", 2)
    assert parse_name("DiT-B/4") == ("dit", "B", 4)
    with pytest.raises(ValueError, match="DiT-S/2"):
        parse_name("ViT-S/2")


# --- diffusion prior --------------------------------------------------------------------------


def test_prior_table_rows_of_switch_dit_s():
    n, e, k, T = 12, 3, 2, 1000
    table = prior_table(T, n, e, k)
    assert table.shape == (T, n * e)
    assert (table.sum(1) == n * k).all()
    first = np.zeros(n * e)
    first[0 : n * k] = 1  # t=0: window starts at round(0) = 0
    last = np.zeros(n * e)
    last[n * e - n * k :] = 1  # t=999: starts at N*E - N*k = 12
    assert np.array_equal(table[0], first)
    assert np.array_equal(table[999], last)
    t = 700
    start = round((t / 999) ** 4 * (n * e - n * k))
    assert np.flatnonzero(table[t]).tolist() == list(range(start, start + n * k))


def brute_force_min_cost(cost):
    import itertools

    n = cost.shape[0]
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_matching_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n, e, k, T = 2, 3, 2, 50
    pattern = (rng.random((T, n * e)) < 0.5).astype(np.float32)
    prior = prior_table(T, n, e, k)
    cost = matching_cost(pattern, prior)
    direct = np.abs(pattern[:, :, None] - prior[:, None, :]).sum(0)
    np.testing.assert_allclose(cost, direct)
    assignment = match_units(pattern, prior, rng)
    assert sorted(assignment) == list(range(n * e))
    assert cost[np.arange(n * e), assignment].sum() == pytest.approx(brute_force_min_cost(cost))


def test_jsd_matches_float64_reference():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4, 12), -1)
    q = torch.zeros(4, 12)
    q[:, 3:7] = 0.25
    got = jensen_shannon(p, q)
    p64, q64 = p.double().numpy() + 1e-6, q.double().numpy() + 1e-6
    m = (p64 + q64) / 2
    ref = 0.5 * (p64 * np.log(p64 / m)).sum(1) + 0.5 * (q64 * np.log(q64 / m)).sum(1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_prior_loss_end_to_end_has_gradient_to_routers():
    _, switch = tiny_pair(num_experts=3, top_k=2)
    switch.train()
    loss_fn = DiffusionPriorLoss(switch.config.depth, 3, 2)
    x = torch.randn(4, 2, 16, 16)
    t = torch.tensor([0, 100, 600, 999])
    _, gates = switch(x, t, torch.tensor([1, 2, 3, 4]), return_gates=True)
    all_gates = switch.gate_probs_for_timesteps(torch.arange(1000))
    loss = loss_fn(gates, t, all_gates, np.random.default_rng(0))
    assert loss.ndim == 0 and 0 < loss.item() < np.log(2)
    loss.backward()
    assert switch.blocks[0].router.gate[1].weight.grad.abs().sum() > 0
    assert topk_pattern(all_gates, 2).sum(1).eq(switch.config.depth * 2).all()


def test_weight_mixed_linear_experts_equal_one_matmul_per_expert():
    """``LocalExperts(mix=True)`` against the per-expert loop in float64: outputs and the gradients
    of the input, the routing weights and every expert; then torch's own finite differences."""
    from switchdit_dist.models.experts import LocalExperts, mixed_linear, route_coefficients

    torch.manual_seed(0)
    loop = LocalExperts(6, 4).double()
    for expert in loop.experts:  # experts start at zero: give them something to differ by
        torch.nn.init.normal_(expert.weight)
        torch.nn.init.normal_(expert.bias)
    mixed = LocalExperts(6, 4, mix=True).double()
    mixed.load_state_dict(loop.state_dict())
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    index = torch.tensor([[0, 1], [3, 1], [2, 0], [1, 3], [0, 2]])
    weight = torch.rand(5, 2, dtype=torch.float64)
    grad_out = torch.randn(5, 3, 6, dtype=torch.float64)
    grads = []
    for experts in (loop, mixed):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = experts(xi, index, wi)
        y.backward(grad_out)
        params = [p.grad for p in experts.parameters()]
        grads.append((y.detach(), xi.grad, wi.grad, *params))
    for reference, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)

    coeff = route_coefficients(index, weight, 4).requires_grad_()
    w = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixed_linear, (x.clone().requires_grad_(), coeff, w, b))
