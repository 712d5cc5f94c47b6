"""retserve model core: a pure-PyTorch RetNet (fla layout) with parallel, chunkwise and recurrent forms."""

from model.checkpoint import CheckpointError, from_pretrained, load_tokenizer, save_pretrained
from model.config import ConfigError, RetNetConfig, preset
from model.retnet import RetNet
from model.state import RetentionState, StateMismatchError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "RetNet",
    "RetNetConfig",
    "RetentionState",
    "StateMismatchError",
    "from_pretrained",
    "load_tokenizer",
    "preset",
    "save_pretrained",
]
