"""ImageBind encoders: configs, the model, checkpoint loading, input transforms.

No web framework, no index library, no settings in here.

    from encoders import load_encoder, resolve_model
    enc = load_encoder(resolve_model("imagebind_huge"), device="cuda")  # enc.ref: which model
    vectors = enc.embed_items("vision", ["cat.jpg", "dog.png"])  # (2, 1024) unit vectors
"""

from .checkpoint import read_state_dict, remap_imagebind_keys, sha256_file
from .config import PRESETS, ModelConfig, PreprocessConfig, TrunkConfig, list_presets
from .dtype import DtypeChoice, choose_dtype, cpu_has_native_bf16
from .encoder import Encoder, load_encoder
from .errors import CheckpointError, DownloadError, EncoderError, InvalidInput, UnknownWeights
from .inputs import InputLimits, preprocess
from .modality import Modality
from .models import DEFAULT_MODEL, ModelRef, resolve_model
from .weights import WEIGHTS, WeightsSpec, download_weights

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "WEIGHTS",
    "CheckpointError",
    "DownloadError",
    "DtypeChoice",
    "Encoder",
    "EncoderError",
    "InputLimits",
    "InvalidInput",
    "Modality",
    "ModelConfig",
    "ModelRef",
    "PreprocessConfig",
    "TrunkConfig",
    "UnknownWeights",
    "WeightsSpec",
    "choose_dtype",
    "cpu_has_native_bf16",
    "download_weights",
    "list_presets",
    "load_encoder",
    "preprocess",
    "read_state_dict",
    "remap_imagebind_keys",
    "resolve_model",
    "sha256_file",
]
