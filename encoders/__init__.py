"""ImageBind encoders: configs, the model, checkpoint loading.

No web framework, no index library, no settings in here.
"""

from .checkpoint import read_state_dict, remap_imagebind_keys, sha256_file
from .config import PRESETS, ModelConfig, PreprocessConfig, TrunkConfig, list_presets
from .encoder import Encoder, load_encoder
from .errors import CheckpointError, DownloadError, EncoderError
from .modality import Modality

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DownloadError",
    "Encoder",
    "EncoderError",
    "Modality",
    "ModelConfig",
    "PreprocessConfig",
    "TrunkConfig",
    "list_presets",
    "load_encoder",
    "read_state_dict",
    "remap_imagebind_keys",
    "sha256_file",
]
