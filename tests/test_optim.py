"""EagerAdam (m3bsr.engine.optim): torch.optim.Adam's updates and state dicts, without torch._dynamo."""

from __future__ import annotations

import torch

from m3bsr.engine.optim import EagerAdam


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return model, x, y


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


def test_updates_and_state_dicts_are_torch_adams_bit_for_bit():
    ref, x, y = _model_and_data()
    ours, _, _ = _model_and_data()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=0.01)
    our_opt = EagerAdam(ours.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(3):
        _step(ref, ref_opt, x, y)
        _step(ours, our_opt, x, y)
        for p, q in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(p, q)
    assert not torch.equal(ref[0].weight, _model_and_data()[0][0].weight)  # the steps did move the weights
    _assert_same_state(ref_opt.state_dict(), our_opt.state_dict())

    # a checkpoint of either loads into the other and continues identically
    swapped_ref = torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=0.01)
    swapped_ref.load_state_dict(our_opt.state_dict())
    swapped_ours = EagerAdam(ours.parameters(), lr=0.05, weight_decay=0.01)
    swapped_ours.load_state_dict(ref_opt.state_dict())
    _step(ref, swapped_ref, x, y)
    _step(ours, swapped_ours, x, y)
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p, q)


def test_step_runs_without_grad_and_keeps_the_callers_grad_mode():
    model, x, y = _model_and_data()
    opt = EagerAdam(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.is_grad_enabled()
    opt.step()  # in-place updates of leaf parameters would raise under grad mode
    assert torch.is_grad_enabled()
    assert all(not p.grad_fn for p in model.parameters())


def test_hooks_run_once_per_step():
    model, x, y = _model_and_data()
    opt = EagerAdam(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    _step(model, opt, x, y)
    _step(model, opt, x, y)
    assert calls == ["pre", "post", "pre", "post"]
