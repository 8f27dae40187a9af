"""Component registries: names, parameters, errors, descriptions, and plugging in a new member."""

import importlib
import pkgutil
from dataclasses import dataclass

import pytest

import workbench as wb
from workbench.attention.sdpa import SDPA
from workbench.registry import Component, Registry, param


def defined_components(package) -> set[str]:
    """The names of the concrete components a package's modules define, found by importing every module (so a
    component that a module defines but forgets to register, or a registration with no class behind it, shows)."""
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, package.registry.base) and value.__module__ ==
                    module.__name__ and isinstance(value.__dict__.get("name"), str)):
                names.add(value.name)
    return names


@pytest.mark.parametrize("family", ["attention", "cache", "decode", "routers"])
def test_every_component_a_family_defines_is_registered_and_builds(family):
    package = getattr(wb, family)
    assert set(package.available()) == defined_components(package)
    for name in package.available():
        component = package.get(name)
        assert component.name == name and package.get(name, **component.params()) == component


def test_unknown_name_lists_registered_members():
    with pytest.raises(wb.UnknownComponentError,
                       match="unknown attention 'nope'; registered: ape, block_sparse, eager, "):
        wb.attention.get("nope")
    with pytest.raises(wb.UnknownComponentError, match="unknown decoder 'nope'; registered: .*, greedy, .*, sample,"):
        wb.decode.get("nope")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(wb.ParameterError, match="cache 'full' has no parameter 'budget'; its parameters: none"):
        wb.cache.get("full", budget=128)
    with pytest.raises(wb.ParameterError, match="cache 'h2o' has no parameter 'budgett'; its parameters: budget, "):
        wb.cache.get("h2o", budgett=128)
    with pytest.raises(wb.ParameterError, match="its parameters: temperature, top_k, top_p, min_p, seed"):
        wb.decode.get("sample", temprature=0.5)


def test_parameters_are_converted_from_strings_and_checked():
    sampler = wb.decode.get("sample", temperature="0.5", top_k="40", seed="none")
    assert (sampler.temperature, sampler.top_k, sampler.seed) == (0.5, 40, None)
    with pytest.raises(wb.ParameterError, match="'top_k' got 'many'; expected int"):
        wb.decode.get("sample", top_k="many")
    with pytest.raises(wb.ParameterError, match="'top_p' is 1.5; it must be <= 1.0"):
        wb.decode.get("sample", top_p=1.5)
    with pytest.raises(wb.ParameterError, match="temperature' must be > 0"):
        wb.decode.get("sample", temperature=0)
    with pytest.raises(wb.ParameterError, match="'top_k' is -1; it must be >= 0"):
        wb.decode.get("sample", top_k=-1)


def test_describe_names_what_paper_and_parameters():
    text = wb.decode.describe("sample")
    assert text.startswith("decoder 'sample': Sample the next token")
    assert "Holtzman" in text
    assert "top_p = 1.0: keep the smallest set of tokens" in text
    assert "parameters: none" in wb.cache.describe("full")
    assert "sdpa" in wb.attention.describe() and "eager" in wb.attention.describe()
    for module in wb.FAMILIES.values():
        for name in module.available():
            assert module.registry.component_class(name).summary, name


def test_built_component_passes_through_and_rejects_extra_params():
    sampler = wb.decode.get("sample", temperature=0.7)
    assert wb.decode.get(sampler) is sampler
    with pytest.raises(wb.ParameterError):
        wb.decode.get(sampler, seed=3)
    assert str(sampler) == "sample(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=0)"
    assert str(wb.cache.get("full")) == "full"


def test_registry_rejects_duplicates_and_foreign_classes():
    registry = Registry("toy", Component)

    @dataclass
    class Toy(Component):
        name = "toy"
        summary = "a toy"
        size: int = param(3, "how big", min=1)

    registry.register(Toy)
    assert registry.get("toy", size=5).size == 5

    @dataclass
    class Other(Component):
        name = "toy"
        summary = "another toy"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other)
    with pytest.raises(TypeError):
        registry.register(int)


@dataclass
class CountingSDPA(SDPA):
    """A plug-in member added by a test: SDPA that counts its calls per layer and records what it was asked."""

    name = "counting_sdpa"
    summary = "SDPA that counts calls (test only)"

    def __post_init__(self):
        super().__post_init__()
        self.calls = []

    def attend(self, call, want):
        self.calls.append((call.layer, call.query.shape[2], want))
        return super().attend(call, want)


def test_a_new_member_plugs_into_the_loop_without_touching_it(tiny_llama):
    wb.attention.register(CountingSDPA)
    try:
        variant = wb.attention.get("counting_sdpa")
        run = wb.generate(tiny_llama, "hello", attention=variant, max_new_tokens=3, ignore_eos=True)
        layers = tiny_llama.num_layers
        assert len(variant.calls) == 3 * layers  # one prefill + two decode steps, every layer
        assert [q for _, q, _ in variant.calls[:layers]] == [5] * layers  # prefill sees the 5 prompt bytes
        assert all(want == frozenset() for _, _, want in variant.calls)  # nothing recorded: nothing asked
        assert run.token_ids == wb.generate(tiny_llama, "hello", max_new_tokens=3, ignore_eos=True).token_ids
    finally:
        wb.attention.registry._members.pop("counting_sdpa")
