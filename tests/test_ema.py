import torch

from switchdit_dist.train.ema import EMA


def test_ema_follows_the_recursion_in_float64_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = EMA(model, decay=0.9)
    reference = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            reference[n] = 0.9 * reference[n] + 0.1 * p.detach().double()
    for n, value in ema.state_dict().items():
        torch.testing.assert_close(value.double(), reference[n], rtol=1e-6, atol=1e-6)


def test_ema_state_round_trip_and_missing_keys():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    state = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.load_state_dict(state)
    assert all(torch.equal(ema.state_dict()[k], state[k]) for k in state)
    try:
        ema.load_state_dict({"weight": state["weight"]})
    except KeyError as err:
        assert "bias" in str(err)
    else:
        raise AssertionError("missing EMA keys must be refused")
