"""seqpar: a torch.compile backend that shards LLM prefill over ranks by sequence or heads."""
from .checkpoint import stand_ins
from .config import Options
from .errors import (CheckpointError, InputError, OptionsError, SeqparError, ShapeConstraintError, ShardingError,
                     UnsupportedOpError)
from .kv import StaleCacheError, local_kv
from .loading import empty_model, from_pretrained
from .strategies import STRATEGIES, Strategy

__all__ = ["Options", "STRATEGIES", "Strategy", "SeqparError", "OptionsError", "InputError", "CheckpointError",
           "ShardingError", "UnsupportedOpError", "ShapeConstraintError", "StaleCacheError", "local_kv",
           "from_pretrained", "empty_model", "stand_ins"]
__version__ = "0.1.0"
