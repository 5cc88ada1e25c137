"""One device resolver behind every entry point: the same answers and one-line messages."""

from __future__ import annotations

import pytest
import torch

from est_calc.devices import parse_device, resolve_device


@pytest.mark.parametrize("bad", ["bogus", "gpu", "cuda:x", "meta", 3])
def test_bad_names_are_one_line_errors_naming_the_option_the_value_and_the_forms(bad):
    with pytest.raises(ValueError) as err:
        resolve_device(bad, what="--device")
    text = str(err.value)
    assert text.startswith(f"--device {bad!r}") and "cuda:N" in text and "\n" not in text
    with pytest.raises(ValueError):
        parse_device(bad)


def test_auto_and_cpu():
    assert parse_device("auto") is None
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_every_entry_point_refuses_cuda_here_in_the_same_words():
    from est_calc.calculator import resolve_device as calculator_resolve
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import _resolve_device
    from md_recipes.cli import check_device

    for check, what in ((calculator_resolve, "device"), (check_device, "--device"),
                        (_resolve_device, "train.device")):
        with pytest.raises(ValueError, match=rf"^{what} 'cuda:1': CUDA is not available on "
                                             "this machine"):
            check("cuda:1")
    # A config file checks the spelling only: it may be run on another machine.
    TrainConfig.from_dict({"data": {"train": "x.h5"}, "train": {"device": "cuda:1"}}).validate()
    with pytest.raises(ValueError, match="^train.device 'gpu0' is not a device"):
        TrainConfig.from_dict({"data": {"train": "x.h5"}, "train": {"device": "gpu0"}}).validate()
