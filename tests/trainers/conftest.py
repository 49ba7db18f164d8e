import pytest

from rlhf_fast.trainers import (
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every trainer test runs on one thread (tests/conftest.py `one_thread`)."""


@pytest.fixture
def make_config():
    return tiny_config


def tiny_config(tmp_path, stage="sft", *, lora=None, steps=4, micro=4, accum=1, lr=1e-3, save_every=0,
                eval_size=16, synthetic_size=64, compile=False, max_prompt_len=48, max_len=112,
                **run) -> TrainConfig:
    """A `tiny` run on the synthetic task, small enough for a CPU test."""
    return TrainConfig(
        stage=stage,
        model=ModelSettings(preset="tiny", attn_backend="sdpa"),
        lora=LoRASettings(enabled=lora, rank=4),
        data=DataSettings(eval_size=eval_size, synthetic_size=synthetic_size, max_prompt_len=max_prompt_len,
                          max_len=max_len),
        optim=OptimSettings(lr=lr, max_steps=steps, warmup_steps=1, micro_batch_size=micro,
                            grad_accum_steps=accum),
        run=RunSettings(output_dir=str(tmp_path), device="cpu", compile=compile, save_every=save_every,
                        eval_every=0, log_every=1, progress=False, **run),
    )
