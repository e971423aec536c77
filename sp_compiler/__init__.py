"""seqpar: a torch.compile backend that shards LLM prefill over ranks by sequence or heads."""
from .config import Options
from .errors import InputError, OptionsError, SeqparError, ShapeConstraintError, ShardingError, UnsupportedOpError
from .kv import StaleCacheError, local_kv
from .strategies import STRATEGIES, Strategy

__all__ = ["Options", "STRATEGIES", "Strategy", "SeqparError", "OptionsError", "InputError", "ShardingError",
           "UnsupportedOpError", "ShapeConstraintError", "StaleCacheError", "local_kv"]
__version__ = "0.1.0"
