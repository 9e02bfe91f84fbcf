"""Test selection: every test that builds or runs a decoder carries the `decoder` marker, so the
decoder path can be run alone against another transformers release (scripts/test_transformers.sh).

The marker follows the models a test builds, whatever the test is called: every tiny model and
bundled model is built from its type or name (`tiny_loaded("llama", ...)`, `load_model("smollm2")`).
A test is a decoder test when its model-type parameter is a decoder's, or, when it has none, when its
own code names a decoder; and whenever a fixture it uses names one (a module-scoped fixture builds it
for whichever of its tests runs first).

And the verifier's check that the machine measures as the table describes is held true, except where
a test marked `machine_check` tests it.
"""

import inspect
import types

import pytest

from tiny_models import DECODER_TYPES, TINY_CONFIGS
from ziplm_planner.aliases import ALIASES
from ziplm_planner.verify import MachineCheck

DECODERS = {*DECODER_TYPES, "smollm2"}
MODELS = {*TINY_CONFIGS, *ALIASES}


MACHINE_PROBLEMS = MachineCheck.problems


@pytest.fixture(scope="session", autouse=True)
def machine_as_profiled():
    """Tests time tiny models beside other work, so whether this machine measures as their tables
    describe depends on its load: the verifier's machine check holds it so (module fixtures that
    compress included), except in the tests of that check (`machine_check`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MachineCheck, "problems", lambda self, tolerance: [])
        yield


@pytest.fixture(autouse=True)
def machine_check(request, monkeypatch):
    """A test marked `machine_check` sets up a disagreement that does not depend on the load, and gets the check."""
    if "machine_check" in request.keywords:
        monkeypatch.setattr(MachineCheck, "problems", MACHINE_PROBLEMS)


def pytest_collection_modifyitems(items):
    for item in items:
        if builds_decoder(item):
            item.add_marker(pytest.mark.decoder)


def builds_decoder(item) -> bool:
    models = parameters(item) & MODELS  # a test parametrized by model type builds the one it is given
    built = models or named_strings(item.function)
    # the fixtures it uses, directly or through other fixtures (this project defines them in the test modules)
    fixtures = [inspect.unwrap(f) for f in (getattr(item.module, name, None) for name in item.fixturenames)
                if callable(f)]
    return bool(built & DECODERS) or any(named_strings(f) & DECODERS for f in fixtures)


def parameters(item) -> set[str]:
    """The strings a test is parametrized with, those inside a tuple or list parameter included."""
    return strings(item.callspec.params.values()) if hasattr(item, "callspec") else set()


def named_strings(function) -> set[str]:
    """The string constants in a function's code, its nested functions' included."""
    def constants(code: types.CodeType) -> set[str]:
        return strings(code.co_consts).union(*(constants(c) for c in code.co_consts if isinstance(c, types.CodeType)))
    return constants(function.__code__) if hasattr(function, "__code__") else set()


def strings(values) -> set[str]:
    """The strings among `values` and inside those of them that are tuples, lists or sets."""
    flat = [v for value in values for v in (value if isinstance(value, (tuple, list, frozenset)) else [value])]
    return {v for v in flat if isinstance(v, str)}
