"""The shared forward-hook recorder: what it keeps, when, and that deep copies of the network leave it alone."""

from __future__ import annotations

import copy

import torch as th
from torch import nn

from rl_plasticity.recording import ForwardRecorder, activation_outputs


def mlp() -> nn.Sequential:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))


def test_activation_outputs_are_the_activations_by_path():
    net, x = mlp(), th.randn(6, 3)
    with activation_outputs(net, detach=False) as acts:
        net(x)
    h1 = th.relu(net[0](x))
    assert list(acts) == ["1", "3"]
    th.testing.assert_close(acts["1"], h1)
    th.testing.assert_close(acts["3"], th.tanh(net[2](h1)))
    assert acts["3"].requires_grad  # detach=False keeps the graph (l2_er differentiates through it)
    net(x)
    with activation_outputs(net) as acts:
        net(x)
    assert not acts["1"].requires_grad
    net(2 * x)  # hooks removed after the block
    th.testing.assert_close(acts["1"], h1)


def test_grad_and_graph_filters_inputs_versions_and_copies():
    net, x = mlp(), th.randn(6, 3)
    net[0].requires_grad_(False)  # frozen first layer on the observations: its output has no graph
    recorder = ForwardRecorder(net, names={"0", "2"}, grad_only=True, graph_only=True, detach=False, keep_inputs=True)
    with th.no_grad():
        net(x)
    assert recorder.outputs == {}  # no_grad calls are not the training pass
    net(x)
    assert list(recorder.outputs) == ["2"]
    assert recorder.inputs["2"] is not None and recorder.outputs["2"].requires_grad
    th.testing.assert_close(recorder.inputs["2"], th.relu(net[0](x)))
    assert recorder.versions["2"] == recorder.outputs["2"]._version
    before = recorder.outputs["2"]
    copy.deepcopy(net)(3 * x)  # a copy shares the hooks but is ignored
    assert recorder.outputs["2"] is before
    recorder.clear()
    assert recorder.outputs == recorder.inputs == recorder.versions == {}
    recorder.remove()
    net(x)
    assert recorder.outputs == {}


def test_trace_links_producers_to_consumers():
    net = mlp()
    with th.no_grad(), ForwardRecorder(net, trace=True) as recorder:
        net(th.randn(2, 3))
    assert recorder.edges == {("0", "1"), ("1", "2"), ("2", "3"), ("3", "4")}
    assert list(recorder.outputs) == ["0", "1", "2", "3", "4"]
