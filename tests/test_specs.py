"""The one spec grammar: model and data specs, eps, norm."""

from __future__ import annotations

import pytest

from asbound.errors import ConfigError, SpecError
from asbound.specs import DataSpec, ModelSpec, format_eps, parse_data_spec, parse_eps, parse_model_spec, parse_norm


@pytest.mark.parametrize(
    "text, expected",
    [
        ("robustbench:Standard", ModelSpec("robustbench", "Standard", "cifar10", "Linf")),
        (
            "robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10",
            ModelSpec("robustbench", "Addepalli2022Efficient_WRN_34_10", "cifar100", "Linf"),
        ),
        ("robustbench:imagenet/linf/Salman2020Do_R18", ModelSpec("robustbench", "Salman2020Do_R18", "imagenet", "Linf")),
        ("file:/tmp/m.pt", ModelSpec("file", "/tmp/m.pt")),
        ("torchvision:resnet18", ModelSpec("torchvision", "resnet18")),
        ("builtin:lenet-adversarial", ModelSpec("builtin", "lenet-adversarial")),
        ("builtin:lenet-adversarial/shape", ModelSpec("builtin", "lenet-adversarial", head="shape")),
    ],
)
def test_model_specs(text, expected):
    assert parse_model_spec(text) == expected


def test_model_spec_round_trips_through_str():
    for text in ("robustbench:cifar100/Linf/X", "file:a.pt", "builtin:lenet-random/shape"):
        assert str(parse_model_spec(text)) == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("hub:resnet", "robustbench:, file:, torchvision:, builtin:"),
        ("robustbench:", "names no model"),
        ("robustbench:a/b", "DATASET/THREAT_MODEL/NAME"),
        ("robustbench:mnist/Linf/X", "cifar10, cifar100, imagenet"),
        ("robustbench:cifar10/L1/X", "Linf, L2"),
        ("", "empty model spec"),
    ],
)
def test_bad_model_specs_list_what_is_valid(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_model_spec(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cifar10", DataSpec("cifar10")),
        ("Fashion-MNIST", DataSpec("fashion-mnist")),
        ("folder:/data/intel", DataSpec("folder", path="/data/intel")),
        ("tensors:x.npz", DataSpec("tensors", path="x.npz")),
        ("dsprites", DataSpec("dsprites", factor="orientation")),
        ("dsprites:shape", DataSpec("dsprites", factor="shape")),
    ],
)
def test_data_specs(text, expected):
    assert parse_data_spec(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [("imagenet", "cifar10, cifar100"), ("dsprites:color", "shape, scale"), ("folder:", "folder:PATH"), ("cifar10:x", "takes no argument")],
)
def test_bad_data_specs_list_what_is_valid(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_data_spec(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.5", 0.5), ("0", 0.0), ("1", 1.0), (0.25, 0.25)])
def test_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["2", "-0.1", "abc", "1/0", "nan", "inf", "300/255"])
def test_bad_eps(text):
    with pytest.raises(ConfigError) as err:
        parse_eps(text)
    assert "[0, 1]" in str(err.value)


def test_an_l2_radius_may_exceed_one():
    assert parse_eps("3", "2") == 3.0 and parse_eps("0.5", "2") == 0.5
    for bad in ("-1", "nan", "inf", "abc"):
        with pytest.raises(ConfigError):
            parse_eps(bad, "2")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_eps("3", "inf")


def test_eps_prints_as_a_fraction_of_255():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.1) == "0.1"
    assert format_eps(3.0) == "3" and format_eps(1.0) == "1" and format_eps(0.0) == "0"


def test_norms():
    assert [parse_norm(t) for t in ("inf", "Linf", "L2", "2")] == ["inf", "inf", "2", "2"]
    with pytest.raises(ConfigError):
        parse_norm("1")
