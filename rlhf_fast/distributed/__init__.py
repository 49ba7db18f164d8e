"""Training strategies (single device; DeepSpeed, imported lazily) behind one interface, and the one
builder that picks between them (`build_strategy`)."""

from .strategy import PRECISIONS, STRATEGIES, BatchLayout, SingleDeviceStrategy, Strategy, build_strategy

_DEEPSPEED_NAMES = ("DeepSpeedSettings", "DeepSpeedStrategy")


def __getattr__(name: str):
    if name in _DEEPSPEED_NAMES:  # the deepspeed module loads on first use, not with this package
        from . import deepspeed

        return getattr(deepspeed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRECISIONS", "STRATEGIES", "BatchLayout", "DeepSpeedSettings", "DeepSpeedStrategy",
           "SingleDeviceStrategy", "Strategy", "build_strategy"]
