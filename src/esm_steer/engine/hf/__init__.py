"""The transformers backend: its own batched decode loop over one KV cache.

Why not ``model.generate``: the online ESM policy needs step-level control -- a steering
vector per row that can change between steps, layer ℓ's hidden state at the last token of
every step (no extra forward), KV-cache forks for probes and n continuations of one prefix,
and control points detected on decoded text. :class:`HFDecodeBatch` provides these;
:meth:`HFEngine.generate` is a thin loop on top of it.

Layout of a batch: rows are left-padded into one ``DynamicCache`` of common length T, with a
2D attention mask [B, T] (0 on padding and on steps a row sat out) and a per-row next
position (positions count real tokens only, as ``generate`` does). Rows are stable integer
handles mapped to their current batch index; fork and drop are ``index_select`` on the batch
dimension of every cache tensor.

Steering and hidden-state capture share one forward hook on decoder layer ℓ, registered once
per engine (``prepend=True`` so that transformers' own output recording sees the steered
output). Outside a batch forward the hook does nothing, so teacher-forced passes are plain.
"""

from esm_steer.engine.hf.batch import HFDecodeBatch
from esm_steer.engine.hf.engine import DTYPES, HFEngine, decoder_layers
from esm_steer.engine.hf.sampling import _sample

__all__ = ["DTYPES", "HFDecodeBatch", "HFEngine", "_sample", "decoder_layers"]
