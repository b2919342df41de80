import pytest
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim=128, hidden=512, out=64):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    """Conv stem (3 input channels: not a multiple of any group size), depthwise conv, linear head,
    plus layer types vqz does not quantize (Conv1d, Embedding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect")
        self.pw = nn.Conv2d(32, 48, 1)
        self.seq = nn.Conv1d(4, 4, 3)
        self.embed = nn.Embedding(10, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))
        return self.head(h.mean((2, 3)) + self.embed.weight[0])


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


@pytest.fixture
def guard():
    """guard(model) records everything a failed quantize/load must leave as it was (tensors,
    module classes, training flags) and returns a check that asserts it still is."""
    def record(model):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        modules = [(n, type(m)) for n, m in model.named_modules()]
        modes = [m.training for m in model.modules()]

        def check():
            now = model.state_dict()
            assert set(now) == set(state)
            for k, v in state.items():
                assert torch.equal(now[k], v), k
            assert [(n, type(m)) for n, m in model.named_modules()] == modules
            assert [m.training for m in model.modules()] == modes
            assert getattr(model, "_vqz_state", None) is None
        return check
    return record
