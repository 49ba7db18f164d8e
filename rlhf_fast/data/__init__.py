"""Tokenizers, datasets (TRL's dataset formats with chat templates, HH-RLHF, prompt files, the built-in synthetic
task), the length/EOS rule, collators and a resumable batch order. Bad data raises `rlhf_fast.errors.DataError`
naming the file and line."""

from .arithmetic import (
    ArithmeticProblem,
    all_problems,
    arithmetic_reward,
    arithmetic_split,
    correctness_reward,
    format_reward,
)
from .chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template
from .examples import (
    PreferenceCollator,
    PreferenceDataset,
    PreferenceExample,
    PromptCollator,
    PromptDataset,
    ResumableBatches,
    SFTCollator,
    SFTDataset,
    SFTExample,
)
from .formats import detect_format
from .hh import load_hh, parse_hh_record, read_hh_jsonl, split_dialogue
from .jsonl import BadExampleError, LoadReport, MissingDataError
from .lengths import EncodedPair, append_eos, encode_pair, fit_response
from .prompts import load_prompts
from .sources import load_preference_splits, load_sft_splits
from .synthetic import synthetic_preferences, synthetic_prompts, synthetic_split
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ArithmeticProblem",
    "BadExampleError",
    "ByteTokenizer",
    "ChatTemplate",
    "DEFAULT_CHAT_TEMPLATE",
    "EncodedPair",
    "HFTokenizer",
    "LoadReport",
    "MissingDataError",
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceExample",
    "PromptCollator",
    "PromptDataset",
    "ResumableBatches",
    "SFTCollator",
    "SFTDataset",
    "SFTExample",
    "Tokenizer",
    "all_problems",
    "arithmetic_reward",
    "arithmetic_split",
    "correctness_reward",
    "detect_format",
    "append_eos",
    "encode_pair",
    "fit_response",
    "format_reward",
    "load_chat_template",
    "load_hh",
    "load_preference_splits",
    "load_prompts",
    "load_sft_splits",
    "load_tokenizer",
    "parse_hh_record",
    "read_hh_jsonl",
    "split_dialogue",
    "synthetic_preferences",
    "synthetic_prompts",
    "synthetic_split",
]
