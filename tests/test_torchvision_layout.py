"""ResNet-18/50/101 against torchvision's published architecture, without torchvision: parameter counts, and
state dicts written in torchvision's key layout (generated here from the architecture description) loaded
into the tool's nets, whose outputs match a functional forward written from that description."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUT, torchvision_state

from diffdistill.models.classifiers import build_classifier, load_torchvision_resnet


def reference_forward(net: str, s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward in eval mode, from the state dict alone."""
    kind, blocks = LAYOUT[net]

    def bn(name, h):
        return F.batch_norm(h, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                            s[f"{name}.bias"], False, 0.0, 1e-5)

    h = F.max_pool2d(F.relu(bn("bn1", F.conv2d(x, s["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for i, n in enumerate(blocks):
        for j in range(n):
            p, stride = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
            if kind == "basic":
                out = F.relu(bn(f"{p}.bn1", F.conv2d(h, s[f"{p}.conv1.weight"], stride=stride, padding=1)))
                out = bn(f"{p}.bn2", F.conv2d(out, s[f"{p}.conv2.weight"], padding=1))
            else:
                out = F.relu(bn(f"{p}.bn1", F.conv2d(h, s[f"{p}.conv1.weight"])))
                out = F.relu(bn(f"{p}.bn2", F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride, padding=1)))
                out = bn(f"{p}.bn3", F.conv2d(out, s[f"{p}.conv3.weight"]))
            short = h
            if f"{p}.downsample.0.weight" in s:
                short = bn(f"{p}.downsample.1", F.conv2d(h, s[f"{p}.downsample.0.weight"], stride=stride))
            h = F.relu(out + short)
    return F.linear(h.mean((2, 3)), s["fc.weight"], s["fc.bias"])


@pytest.mark.parametrize("net, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                         ("resnet101", 44_549_160)])
def test_resnets_have_torchvisions_parameter_counts(net, params):
    model = build_classifier(net, 3, 1000, 224)  # the protocol's default norm for these nets: batch
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("net", ["resnet18", "resnet50"])
def test_torchvision_state_dicts_load_and_give_torchvisions_outputs(net):
    g = torch.Generator().manual_seed(0)
    state = torchvision_state(net, 10, g)
    model = load_torchvision_resnet(build_classifier(net, 3, 10, 128), state, "teacher.safetensors").eval()
    x = torch.randn(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward(net, state, x), atol=1e-4, rtol=1e-4)


def test_model_zoo_files_without_batchnorm_step_counters_load():
    """torchvision's published ResNet files predate BatchNorm's num_batches_tracked buffers."""
    state = torchvision_state("resnet18", 10, torch.Generator().manual_seed(2))
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = load_torchvision_resnet(build_classifier("resnet18", 3, 10, 128), old, "resnet18-f37072fd.pth").eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward("resnet18", state, x), atol=1e-4, rtol=1e-4)


def test_a_state_dict_of_another_architecture_is_refused_in_one_line():
    state = torchvision_state("resnet50", 10, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"^teacher.pth: not the state dict of this ResNet .*(missing|unexpected)"):
        load_torchvision_resnet(build_classifier("resnet18", 3, 10, 128), state, "teacher.pth")
    state = torchvision_state("resnet18", 1000, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"^teacher.pth: classifier.weight has shape \(1000, 512\)"):
        load_torchvision_resnet(build_classifier("resnet18", 3, 10, 128), state, "teacher.pth")
