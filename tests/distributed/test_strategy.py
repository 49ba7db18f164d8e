import pytest
import torch
import torch.nn as nn

from rlhf_fast.distributed import SingleDeviceStrategy


def _setup(max_grad_norm=None, lr=0.1):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    strategy = SingleDeviceStrategy("cpu", "fp32", max_grad_norm)
    strategy.prepare(model, opt, sched)
    return model, strategy


def test_step_applies_accumulated_gradients_then_zeroes_them():
    model, strategy = _setup()
    x = torch.randn(4, 5)
    w0 = model.weight.detach().clone()
    for part in x.chunk(2):
        strategy.backward(model(part).sum())
    grad = model.weight.grad.clone()
    torch.testing.assert_close(grad, torch.ones(3, 1) * x.sum(0))
    norm = strategy.step()
    assert norm == pytest.approx(float(torch.cat([grad.flatten(), torch.full((3,), 4.0)]).norm()), rel=1e-5)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * grad)
    assert model.weight.grad is None
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler stepped too


def test_clipping_happens_after_backward():
    model, strategy = _setup(max_grad_norm=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # clip the accumulated gradient, not each micro-batch's
        strategy.backward(model(torch.randn(8, 5)).sum() * 100)
    assert strategy.step() > 0.5  # the pre-clip norm is reported
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert float(moved) == pytest.approx(0.1 * 0.5, rel=1e-4)  # SGD update of norm lr * max_grad_norm


def test_state_dict_round_trip_and_bad_arguments():
    model, strategy = _setup()
    strategy.backward(model(torch.randn(2, 5)).sum())
    strategy.step()
    state = strategy.state_dict()
    _, other = _setup()
    other.load_state_dict(state)
    assert other.scheduler.last_epoch == 1
    with pytest.raises(ValueError, match="precision"):
        SingleDeviceStrategy("cpu", "fp8")
    with pytest.raises(ValueError, match="max_grad_norm"):
        SingleDeviceStrategy("cpu", "fp32", 0.0)
    with pytest.raises(RuntimeError, match="before prepare"):
        SingleDeviceStrategy("cpu").backward(torch.zeros((), requires_grad=True))


def test_bf16_autocast_on_cpu():
    strategy = SingleDeviceStrategy("cpu", "bf16")
    with strategy.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_fp16_off_cuda_runs_but_says_so(caplog):
    with caplog.at_level("WARNING", logger="rlhf_fast"):
        SingleDeviceStrategy("cpu", "fp16")
        SingleDeviceStrategy("cpu", "bf16")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["--precision fp16 on cpu"]
