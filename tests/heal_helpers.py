"""What the healing tests (test_heal.py, test_heal_cli.py, test_plan_search.py) share: the SmolLM2
tokenizer, logits, which weights changed, and the record a conversion writes."""
from __future__ import annotations

import json

import pytest
import torch

IDS = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def changed(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def read_record(path) -> dict:
    return json.loads((path / "d2m_plan.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
