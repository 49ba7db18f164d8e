import pytest
import torch

from rlhf_fast.trainers import (
    DataSettings,
    LoRASettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model steps run faster on one thread than on two contended ones (CI has 2 shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
