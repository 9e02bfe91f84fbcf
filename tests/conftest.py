"""Test selection: every test that builds or runs a decoder carries the `decoder` marker, so the
decoder path can be run alone against another transformers release (scripts/test_transformers.sh)."""

import pytest

from tiny_models import DECODER_TYPES

_DECODER_WORDS = (*DECODER_TYPES, "decoder", "causal", "smollm", "perplexity", "generat", "decode")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(word in item.nodeid.lower() for word in _DECODER_WORDS):
            item.add_marker(pytest.mark.decoder)
