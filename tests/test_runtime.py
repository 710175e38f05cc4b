from __future__ import annotations

import pytest
import torch

from ofactl.errors import ConfigError
from ofactl.runtime import autocast_dtype, check_device_name, module_device, resolve_device


@pytest.mark.parametrize("name", ["gpu", "cuda7", "CUDA", "cuda:x", "", "cpu:0 "])
def test_bad_device_names_are_one_clear_error(name):
    with pytest.raises(ConfigError, match=r"--device .*expected auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_device_that_this_machine_lacks_names_the_flag():
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"has {n} CUDA device"):
            resolve_device(f"cuda:{n + 6}")
    else:
        with pytest.raises(ConfigError, match="--device cuda:7: no CUDA device"):
            resolve_device("cuda:7")


def test_auto_and_cpu_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name("cuda:3")  # syntax alone is fine without a GPU


def test_precision_rules():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="--precision 'half'"):
        autocast_dtype("half", cpu)


def test_module_device_follows_parameters():
    m = torch.nn.Linear(2, 2).to("meta")
    assert module_device(m).type == "meta"
    assert module_device(torch.nn.Identity()) == torch.device("cpu")
