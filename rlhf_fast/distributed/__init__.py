"""Training strategies (single device; DeepSpeed, imported lazily) behind one interface."""

from .deepspeed import DeepSpeedSettings, DeepSpeedStrategy
from .strategy import PRECISIONS, SingleDeviceStrategy, Strategy

__all__ = ["PRECISIONS", "DeepSpeedSettings", "DeepSpeedStrategy", "SingleDeviceStrategy", "Strategy"]
