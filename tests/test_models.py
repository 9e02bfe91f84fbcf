"""Finding models: a hub id that is neither cached nor reachable is refused at once, in one line."""

import time

import pytest

from ziplm_planner.errors import UserError
from ziplm_planner.aliases import resolve_model
from ziplm_planner.models import check_hub_model, load_model

MADE_UP = "ziplm-planner-tests/no-such-model"


def test_unreachable_hub_id_is_refused_at_once():
    # no HF_HUB_OFFLINE here: that is the user's case; huggingface_hub alone retried for ~25 s
    started = time.perf_counter()
    with pytest.raises(UserError, match=f"model {MADE_UP} is not in the local Hugging Face cache") as err:
        load_model(MADE_UP)
    assert time.perf_counter() - started < 15
    assert "\n" not in str(err.value) and "give a local folder" in str(err.value)


def test_offline_mode_is_named(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot be fetched .*offline mode"):
        check_hub_model(MADE_UP)


def test_a_cached_hub_id_needs_no_network(monkeypatch, tmp_path):
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "models--ziplm-planner-tests--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any request would fail
    check_hub_model("ziplm-planner-tests/cached")


def test_local_paths_are_not_hub_ids(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not resolve_model(str(tmp_path)).on_hub
    assert resolve_model(MADE_UP).on_hub
