"""Training strategies (single device; DeepSpeed, imported lazily) behind one interface."""

from .strategy import PRECISIONS, SingleDeviceStrategy, Strategy

__all__ = ["PRECISIONS", "SingleDeviceStrategy", "Strategy"]
