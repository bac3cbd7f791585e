"""The one spec grammar: model and data specs, eps, norm."""

from __future__ import annotations

import pytest

from asbound.errors import ConfigError, SpecError
from asbound.specs import (
    DATA_SOURCES,
    DataSpec,
    ModelSpec,
    format_classes,
    format_eps,
    parse_classes,
    parse_data_spec,
    parse_eps,
    parse_model_spec,
    parse_norm,
)


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
        ("digits", DataSpec("digits")),
        ("Digits", DataSpec("digits")),
    ],
)
def test_data_specs(text, expected):
    assert parse_data_spec(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [("imagenet", "cifar10, cifar100"), ("imagenet", "mnist, digits, folder:PATH"), ("dsprites:color", "shape, scale"),
     ("folder:", "folder:PATH"), ("cifar10:x", "takes no argument"), ("digits:8x8", "takes no argument")],
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


def test_digits_is_a_data_source():
    assert "digits" in DATA_SOURCES and str(parse_data_spec("digits")) == "digits"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0-4", (0, 1, 2, 3, 4)),
        ("5-9", (5, 6, 7, 8, 9)),
        ("0,2,4", (0, 2, 4)),
        ("1-3,7", (1, 2, 3, 7)),
        (" 3 ", (3,)),
        ("7, 2", (7, 2)),  # the order given is the new labelling
        ("0 - 2, 10", (0, 1, 2, 10)),
        ("4-4", (4,)),
        ([9, 0], (9, 0)),
        ((5,), (5,)),
    ],
)
def test_classes(text, expected):
    assert parse_classes(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty entry"),
        ("  ", "empty entry"),
        ("1,,2", "empty entry"),
        ("-1", "negative"),
        ("2,-3", "negative"),
        ("4-0", "reversed"),
        ("1,1", "given twice: 1"),
        ("1-3,2", "given twice: 2"),
        ("a", "'a' is not a label"),
        ("1.5", "not a label"),
        ("0-", "not a label"),
        ("0-99999999", "more than"),
        ([], "no classes"),
        ([-1, 2], "negative"),
        ([1, 1], "twice"),
        ([True], "integers"),
        (3, "give class labels"),
    ],
)
def test_bad_classes_show_the_valid_forms(text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_classes(text)
    msg = str(err.value)
    assert fragment in msg and "0-4, 5-9, 0,2,4 or 1-3,7" in msg and "\n" not in msg


def test_classes_print_compactly():
    assert format_classes((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8" and format_classes(()) == ""
    for text in ("0-9", "5-9,0", "3", "1,3,5"):
        assert format_classes(parse_classes(text)) == text
