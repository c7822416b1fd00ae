"""``regate-fx inspect``: will ReGATE token elision work on my model? Answered in seconds, without weights.

    regate-fx inspect llama                       # a family name (transformers' model_type)
    regate-fx inspect path/to/config.json --json  # a config file, or a directory holding one
    regate-fx inspect --all --markdown docs/families.md

For one target, :func:`inspect_model`:

1. builds the config (``AutoConfig.for_model(name)`` for a family name, ``AutoConfig.from_pretrained``
   for a file or directory) and shrinks it to tiny sizes **generically** (:func:`shrink_config`:
   it walks the config and its sub-configs and caps well-known size attributes, keeping heads
   dividing hidden; no per-family table);
2. builds the model with random weights through transformers' auto mappings
   (``AutoModelForImageTextToText`` first when the config nests a ``text_config``, else
   ``AutoModelForCausalLM``), in float32, eval mode, dropout off;
3. sparsifies it (``backend="eager"``, strict) and runs one sparse step on a random text batch
   with a random keep mask: a :class:`~regate_fx.RewriteError` is a **refused** verdict with the
   report's reasons (:class:`~regate_fx.Reason` names; ``CAPTURE`` when the refusal came before the
   analysis: dynamo could not capture the model as one graph, or the capture mode does not fit it);
   Before that, one dense forward must run (it also counts the FLOPs): a tiny model that does not
   run dense is an error of the generic shrinking, not a refusal (retried once with the original
   head dims). A model whose forward takes no ``position_ids`` (BART-style learned positions) is
   checked with a prefix keep mask, since the oracle cannot give it original positions;
4. runs :func:`regate_fx.oracle` on the same batch and says **exact-sparse** only when the sparse
   loss and the logits at kept positions equal the oracle's. Anything else (the model cannot be
   built tiny, a forward fails, the sparse result differs from the oracle) is verdict **error**
   with the message.

Multimodal models are checked on a text-only batch (no pixel inputs: building them generically
for every family is not attempted), which exercises their decoder; the result says so.

Kept-FLOP fraction: the report names the module of every residual branch (``BranchRecord.module``);
:class:`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of every module (matmuls,
convolutions, attention) in one dense forward of the tiny model. The fraction is the FLOPs of the
rewritten branches' modules over the FLOPs of all decoder layers (``BranchRecord.layer``), so it
is measured on the dense model's modules, not on the rewritten graph's nodes, and at the tiny
sizes (attention's share grows with the sequence length). It is ``None`` when the model is refused
(strict mode runs nothing sparse) or when no branch module could be matched.
"""

from regate_fx.inspect.check import inspect_model
from regate_fx.inspect.cli import main
from regate_fx.inspect.result import BranchInfo, InspectResult, ReasonInfo
from regate_fx.inspect.shrink import all_families, shrink_config

__all__ = ["BranchInfo", "InspectResult", "ReasonInfo", "all_families", "inspect_model", "main", "shrink_config"]
