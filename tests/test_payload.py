import pytest
import torch

from fedbench.api.payload import ContractError, analytic_bytes, check_upload, deserialize, header_bytes, serialize


def test_serialized_bytes_equal_analytic_count_plus_header():
    payload = {"a.lora_A": torch.randn(2, 8, 16), "b.lora_B": torch.randn(2, 16, 8), "h": torch.randn(5).half()}
    blob = serialize(payload)
    assert analytic_bytes(payload) == (2 * 8 * 16 + 2 * 16 * 8) * 4 + 5 * 2
    assert len(blob) == analytic_bytes(payload) + header_bytes(blob)
    assert header_bytes(blob) < 400  # the header is small next to the tensors
    back = deserialize(blob)
    assert set(back) == set(payload) and all(torch.equal(back[k], payload[k]) for k in payload)


def test_upload_with_local_tensor_is_rejected():
    with pytest.raises(ContractError, match="local tensor"):
        check_upload({"head.w": torch.ones(1)}, shared={"lora.A"}, local={"head.w"}, method="toy")
    with pytest.raises(ContractError, match="not tagged shared"):
        check_upload({"stray": torch.ones(1)}, shared={"lora.A"}, local=set(), method="toy")
    check_upload({"lora.A": torch.ones(1)}, shared={"lora.A"}, local={"head.w"}, method="toy")
