"""Physical shrinking of channel-pruned layers (autosparse.export.shrink)."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autosparse.candidate import Candidate, LayerChoice
from autosparse.compress import bake, compress_model
from autosparse.export.shrink import ShrinkReport, shrink_model
from autosparse.models import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)


def channel(bits: int = 32, sparsity: float = 0.5) -> LayerChoice:
    return LayerChoice.make("channel", sparsity, bits)


def compressed(model: nn.Module, choices: dict[str, LayerChoice]) -> nn.Module:
    return bake(compress_model(model, Candidate(choices))).eval()


def shrink(baked: nn.Module, choices: dict[str, LayerChoice],
           shape: tuple[int, ...] = SHAPE) -> tuple[nn.Module, ShrinkReport]:
    small, report = shrink_model(baked, Candidate(choices), shape)
    return small.eval(), report


def assert_same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() < 1e-5


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_norms(model: nn.Module) -> None:
    """Trained-like BatchNorms: a zero channel comes out as a nonzero constant."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -1, 1)


class BNNet(nn.Module):
    """conv-bn-relu twice, global pool, linear; ``pad`` sets conv2's padding."""

    def __init__(self, pad: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=pad)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.sigmoid(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x)) + x
        return self.fc(torch.flatten(F.relu(self.conv3(x)), 1))


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(x.view(x.size(0), -1))


class BranchyNet(nn.Module):
    """Data-dependent control flow: symbolic tracing fails."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(x.flatten(1))


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


def test_digits_cnn_all_layers_shrink(seeded):
    choices = {name: channel(8) for name in ("conv1", "conv2", "conv3", "fc1")}
    baked = compressed(DigitsCNN(1, 8, 8, 10), choices)
    small, report = shrink(baked, choices)

    assert (small.conv1.out_channels, small.conv2.in_channels) == (8, 8)
    assert (small.conv2.out_channels, small.conv3.in_channels) == (16, 16)
    assert (small.conv3.out_channels, small.fc1.in_features) == (16, 16 * 16)
    assert (small.fc1.out_features, small.fc2.in_features) == (32, 32)
    assert small.fc1.weight.shape == (32, 256) and small.fc2.weight.shape == (10, 32)
    expected = (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 16 * 9 + 16) + (256 * 32 + 32) \
        + (32 * 10 + 10)
    assert report.parameters_after == n_params(small) == expected
    assert report.parameters_before == n_params(baked)
    assert report.refused == {}
    assert report.layer("conv3").consumers == ("fc1",)
    assert (report.layer("conv2").channels_before, report.layer("conv2").channels_after) == (32, 16)
    assert_same_outputs(baked, small)
    assert baked.conv1.out_channels == 16 and baked.conv1.weight.shape[0] == 16  # input untouched


def test_digits_mlp_shrinks(seeded):
    choices = {"fc1": channel(), "fc2": channel(8, 0.25)}
    baked = compressed(DigitsMLP(64, 10), choices)
    small, report = shrink(baked, choices)
    assert small.fc1.weight.shape == (64, 64) and small.fc2.weight.shape == (48, 64)
    assert small.fc3.weight.shape == (10, 48)
    assert report.parameters_after == 64 * 64 + 64 + 64 * 48 + 48 + 48 * 10 + 10
    assert_same_outputs(baked, small)


def test_batchnorm_constants_fold_into_the_next_bias(seeded):
    model = BNNet()
    randomise_norms(model)
    choices = {"conv1": channel(), "conv2": channel()}
    baked = compressed(model, choices)
    small, report = shrink(baked, choices)
    assert report.shrunk == ("conv1", "conv2")
    assert report.layer("conv1").consumers == ("bn1", "conv2")
    assert small.bn1.num_features == 4 and small.bn1.running_mean.shape == (4,)
    assert small.bn2.num_features == 8 and small.fc.in_features == 8
    assert_same_outputs(baked, small)


def test_padded_consumer_after_batchnorm_is_refused(seeded):
    model = BNNet(pad=1)
    randomise_norms(model)
    choices = {"conv1": channel(), "conv2": channel()}
    baked = compressed(model, choices)
    small, report = shrink(baked, choices)
    reason = report.refused["conv1"]
    assert "conv2 zero-pads" in reason and "channels kept as zeros" in reason
    assert small.conv1.out_channels == 8 and small.conv2.in_channels == 8
    assert small.conv2.out_channels == 8  # conv2 itself still shrinks (its consumer is a Linear)
    assert_same_outputs(baked, small)


def test_residual_add_is_refused(seeded):
    choices = {"conv1": channel(), "conv2": channel(), "conv3": channel()}
    baked = compressed(ResidualNet(), choices)
    small, report = shrink(baked, choices)
    assert set(report.refused) == {"conv1", "conv2"}
    assert report.refused["conv2"] == \
        "conv2: output feeds an add (residual connection): channels kept as zeros"
    assert small.conv2.out_channels == 8
    assert small.conv3.out_channels == 4 and small.fc.in_features == 4 * 64
    assert_same_outputs(baked, small)


def test_concatenation_is_refused(seeded):
    choices = {"a": channel(), "b": channel()}
    baked = compressed(CatNet(), choices)
    small, report = shrink(baked, choices)
    assert set(report.refused) == {"a", "b"}
    assert "concatenation" in report.refused["a"]
    assert report.parameters_after == report.parameters_before
    assert_same_outputs(baked, small)


def test_model_output_and_grouped_conv_are_refused(seeded):
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 16, 10))
    choices = {"0": channel(), "2": channel(), "4": channel()}
    baked = compressed(model, choices)
    small, report = shrink(baked, choices)
    assert "grouped/depthwise" in report.refused["0"]
    assert "not a Linear or an ungrouped" in report.refused["2"]
    assert "model output" in report.refused["4"]
    assert_same_outputs(baked, small)


def test_untraceable_model_is_returned_unchanged(seeded):
    choices = {"conv": channel()}
    baked = compressed(BranchyNet(), choices)
    small, report = shrink(baked, choices)
    assert report.error is not None and "symbolic tracing failed" in report.error
    assert "symbolic tracing failed" in report.refused["conv"]
    assert small.conv.out_channels == 8
    assert_same_outputs(baked, small)


def test_candidate_without_channel_layers_gives_an_equal_model(seeded):
    choices = {"conv2": LayerChoice.make("unstructured", 0.5, 8),
               "fc1": LayerChoice.make("2:4", 0.5, 32)}
    baked = compressed(DigitsCNN(1, 8, 8, 10), choices)
    small, report = shrink(baked, choices)
    assert report.layers == () and report.parameters_after == report.parameters_before
    before, after = baked.state_dict(), small.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_parametrized_model_is_rejected(seeded):
    choices = {"conv1": channel()}
    with pytest.raises(ValueError, match="bake"):
        shrink_model(compress_model(DigitsCNN(1, 8, 8, 10), Candidate(choices)),
                     Candidate(choices), SHAPE)


def test_report_is_json(seeded):
    choices = {"conv1": channel(), "conv2": channel()}
    _, report = shrink(compressed(ResidualNet(), choices), choices)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0] == {"name": "conv1", "channels_before": 8, "channels_after": 8,
                                 "consumers": [], "refused": report.refused["conv1"]}
    assert "conv2: output feeds an add" in report.describe()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is asked for
def test_shrunk_model_runs_in_onnxruntime(seeded):
    ort = pytest.importorskip("onnxruntime")
    model = BNNet()
    randomise_norms(model)
    choices = {"conv1": channel(8), "conv2": channel(8)}
    baked = compressed(model, choices)
    small, _ = shrink(baked, choices)
    assert "Conv2d(4, 8" in str(small)
    x = torch.randn(3, *SHAPE)
    buffer = io.BytesIO()
    torch.onnx.export(small, (x,), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert abs(torch.from_numpy(out) - baked(x)).max() < 1e-4
