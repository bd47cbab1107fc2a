import pytest
import torch

from fedbench.api.aggregate import weighted_mean
from fedbench.api.method import ClientInfo, Method, Reply


def _reply(client: int, n: int, **tensors: torch.Tensor) -> Reply:
    return Reply(ClientInfo(client, ("vqa",), False, n), dict(tensors), n)


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([0.0])}
    out = weighted_mean([a, b], [1, 3])
    # (1*1 + 3*4)/4 = 3.25 ; (1*2 + 3*8)/4 = 6.5 ; (1*3 + 0)/4 = 0.75
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert torch.allclose(out["b"], torch.tensor([0.75]))


def test_tensor_missing_from_some_payloads_is_averaged_over_its_holders():
    out = weighted_mean([{"x": torch.tensor([2.0])}, {"x": torch.tensor([6.0]), "y": torch.tensor([5.0])}], [3, 1])
    assert torch.allclose(out["x"], torch.tensor([3.0]))  # (3*2 + 1*6)/4
    assert torch.allclose(out["y"], torch.tensor([5.0]))  # only one holder


def test_weights_must_be_positive_and_aligned():
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_mean([{"x": torch.ones(1)}], [0])
    with pytest.raises(ValueError, match="2 weights"):
        weighted_mean([{"x": torch.ones(1)}], [1, 2])


def test_fedavg_aggregate_is_example_weighted_and_keeps_untouched_server_tensors():
    server = {"A": torch.zeros(2), "B": torch.zeros(2), "unsent": torch.tensor([7.0])}
    replies = [
        _reply(0, 10, A=torch.tensor([1.0, 1.0]), B=torch.tensor([0.0, 2.0])),
        _reply(1, 30, A=torch.tensor([5.0, 9.0]), B=torch.tensor([4.0, 2.0])),
    ]
    new = Method().aggregate(server, replies)
    assert torch.allclose(new["A"], torch.tensor([4.0, 7.0]))  # (10*1+30*5)/40, (10*1+30*9)/40
    assert torch.allclose(new["B"], torch.tensor([3.0, 2.0]))
    assert torch.equal(new["unsent"], server["unsent"])
    assert torch.equal(server["A"], torch.zeros(2)), "aggregate must not mutate its input"
