"""Training strategies (single device; DeepSpeed, imported lazily) behind one interface."""
