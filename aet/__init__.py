"""ae-transfer: pretrained autoencoder encoders, served over gRPC, for transfer learning.

The public API (imported on first use, so `aet serve` never loads torch):

- `aet.Encoder`: an exported encoder run in this process (onnxruntime).
- `aet.EmbeddingClient`: embeddings from an `aet serve` server over gRPC.
- `aet.AutoencoderEmbedder`: a scikit-learn transformer that pretrains an autoencoder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aet.clients.client import EmbeddingClient
    from aet.encoder import Encoder
    from aet.sklearn import AutoencoderEmbedder

_EXPORTS = {
    "Encoder": "aet.encoder",
    "EmbeddingClient": "aet.clients.client",
    "AutoencoderEmbedder": "aet.sklearn",
}
__all__ = ["Encoder", "EmbeddingClient", "AutoencoderEmbedder"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
