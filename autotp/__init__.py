"""autotp: automatic tensor parallelism for HuggingFace transformers, with ZeRO data parallelism.

    engine, optimizer, _, _ = autotp.initialize(model=model, optimizer=optimizer, config=ds_config)
"""

from .checkpoint import consolidated_adapter_state_dict, consolidated_state_dict, save_pretrained
from .compat import is_autotp_training_mode, set_autotp_mode, tp_model_init
from .config import AutoTPConfig, ConfigError, parse_config
from .engine import Engine, initialize
from .groups import init_distributed
from .plan import PlanError
from .presets import PRESETS
from .replace import parallelize
from .resume import CheckpointError
from .vocab_parallel import enable_vocab_parallel_loss, full_logits

__version__ = "0.1.0"

__all__ = ["initialize", "parallelize", "init_distributed", "set_autotp_mode", "tp_model_init",
           "is_autotp_training_mode", "Engine",
           "ConfigError", "PlanError", "CheckpointError", "AutoTPConfig", "parse_config", "consolidated_state_dict",
           "consolidated_adapter_state_dict", "save_pretrained", "enable_vocab_parallel_loss", "full_logits", "PRESETS",
           "__version__"]
