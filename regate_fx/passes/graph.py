"""Small pure helpers over dynamo FX graphs: values, symbolic token axes, ancestry."""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, cast

import torch
import torch.fx as fx

__all__ = [
    "Ancestry",
    "VIEW_OPS",
    "mutates",
    "fill_values",
    "is_sdpa",
    "value_free_meta",
    "sdpa_arg",
    "set_sdpa_arg",
    "TokenSymbols",
    "node_value",
    "op_name",
    "tensor_inputs",
    "module_path",
    "param_path",
    "specialize_inputs",
]


def node_value(node: fx.Node) -> Any:
    """The fake value dynamo recorded for `node` (tensor, SymInt, tuple, ...) or None."""
    return node.meta.get("example_value", node.meta.get("val"))


_VALUE_KEYS = ("example_value", "val", "tensor_meta", "unbacked_bindings")


def value_free_meta(meta: dict) -> dict:
    """A copy of a node's meta without its recorded values (kept: stack trace, module stack, tags)."""
    return {k: v for k, v in meta.items() if k not in _VALUE_KEYS}


def fill_values(graph: fx.Graph) -> int:
    """Record a fake ``example_value`` on every call node that has none (nodes the rewrite added),
    computed in the graph's own fake mode and ShapeEnv from its inputs' values.

    AOTAutograd's cache requires a value on the tensor a method is called on, and inductor's
    pre-grad passes read them. Returns the number of nodes filled (0 outside a dynamo compile).
    """
    todo = [n for n in graph.nodes if n.op in ("call_function", "call_method") and "example_value" not in n.meta]
    if not todo:
        return 0
    # The mode of the recorded values (dynamo hands the backend a fresh mode on the same ShapeEnv).
    mode = next(
        (
            v.fake_mode
            for n in graph.nodes
            if n.op == "placeholder" and isinstance(v := node_value(n), torch._subclasses.FakeTensor)
        ),
        None,
    )
    if mode is None:
        return 0
    grad = torch.is_grad_enabled()
    # As while dynamo traces: a user's saved-tensor hooks (active around the first call) never see fakes.
    no_hooks = getattr(torch._dynamo.utils, "_disable_saved_tensors_hooks_during_tracing", contextlib.nullcontext)
    try:
        with mode, no_hooks():
            for n in todo:
                if n.target in _GLOBAL_STATE:  # not run here: no tensor value, and it would change our state
                    n.meta["example_value"] = None
                    continue
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), node_value)
                if n.op == "call_method":
                    value = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    value = n.target(*args, **kwargs)
                n.meta["example_value"] = value
    finally:
        torch.set_grad_enabled(grad)
    return len(todo)


def specialize_inputs(graph: fx.Graph) -> dict[str, int]:
    """Guard every symbolic size of the graph's inputs to its value in this call.

    Dynamo checks these guards before each call, so a call with another batch size, length or
    kept count recompiles (``SparsifyConfig(dynamic=None)``: the second compile keeps its sizes
    symbolic). Until then the inner compiler traces static sizes, which AOTAutograd does several
    times faster (keeping only the kept count symbolic saves almost nothing: most of the graph
    runs on kept tokens). Called after the analysis and the rewrite, which read the symbols.
    Returns ``{symbol: value}`` of what was specialised (empty outside dynamo).
    """
    done: dict[str, int] = {}
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = node_value(n)
        sizes = tuple(v.shape) if isinstance(v, torch.Tensor) else (v,) if isinstance(v, torch.SymInt) else ()
        for s in sizes:
            # Backed sizes only (an input's size always is): guarding an unbacked one would raise.
            if isinstance(s, torch.SymInt) and s.node.has_hint() and not s.node.expr.is_number:
                name = str(s.node.expr)
                done[name] = int(s)  # int() = guard_int: dynamo guards this value
    return done


# Graph nodes that switch global state (grad mode, autocast) rather than compute a value.
_GLOBAL_STATE = frozenset(
    {torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast}
)


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node calls: 'linear', 'view', 'add', 'scaled_dot_product_attention'."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if t is operator.getitem:
            return "getitem"
        name = getattr(t, "__name__", None) or str(t)
        return name.lstrip("_") if name.startswith("__") else name
    return node.op


_SDPA_POSITIONS = {
    "query": 0,
    "key": 1,
    "value": 2,
    "attn_mask": 3,
    "dropout_p": 4,
    "is_causal": 5,
    "scale": 6,
    "enable_gqa": 7,
}


def is_sdpa(node: fx.Node) -> bool:
    """Whether `node` calls scaled_dot_product_attention (torch.nn.functional or torch._C._nn)."""
    return node.op == "call_function" and "scaled_dot_product_attention" in getattr(node.target, "__name__", "")


def sdpa_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An SDPA argument by name, wherever the call put it (positional or keyword)."""
    pos = _SDPA_POSITIONS[name]
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def set_sdpa_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set an SDPA argument by name, where the call put it."""
    pos = _SDPA_POSITIONS[name]
    if len(node.args) > pos:
        node.update_arg(pos, value)
    else:
        node.update_kwarg(name, value)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes of `node` whose recorded value is a tensor."""
    return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]


def module_path(node: fx.Node) -> str:
    """The path of the module whose forward made `node` (dynamo's `nn_module_stack`), or ''.

    `L['model'].model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj`.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    if path.startswith(("L[", "G[")) and "]" in path:
        path = path.split("]", 1)[1].lstrip(".")
    if path == "__self__" or path.startswith("__self__."):  # captured through a bound forward
        path = path[len("__self__.") :]
    return path


def param_path(placeholder_name: str) -> str | None:
    """Turn dynamo's lifted-parameter name into a module path, for reports only.

    `l_model_modules_model_modules_layers_modules_0_modules_mlp_modules_up_proj_parameters_weight_`
    -> `model.layers.0.mlp.up_proj.weight`.
    """
    for marker in ("_parameters_", "_buffers_"):
        if marker in placeholder_name:
            head, leaf = placeholder_name.split(marker, 1)
            break
    else:
        return None
    parts = head.split("_modules_")[1:]  # drop the 'l_model' / 'g_m' root
    return ".".join(parts + [leaf.rstrip("_")])


@dataclass(frozen=True)
class TokenSymbols:
    """The batch and sequence sizes of the captured call, as canonical sympy expressions.

    Dynamo unifies symbols while tracing (an attention mask's length symbol may replace the
    input ids' one), so every comparison goes through the ShapeEnv's replacements.
    """

    shape_env: Any
    batch: Any
    seq: Any
    _memo: dict = field(default_factory=dict, compare=False, repr=False)
    """canon() by the size's own expression: the analysis asks about the same few sizes thousands
    of times (the ShapeEnv's replacements do not change during it)."""

    @classmethod
    def from_value(cls, seq_value: torch.Tensor) -> "TokenSymbols | None":
        env = getattr(getattr(seq_value, "fake_mode", None), "shape_env", None)
        if env is None:
            return None
        b, t = seq_value.shape[0], seq_value.shape[1]
        sym = cls(env, None, None)
        return cls(env, sym.canon(b), sym.canon(t))

    def canon(self, size: Any) -> Any:
        import sympy

        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            out = self._memo.get(expr)
            if out is None:
                out = self._memo[expr] = self.shape_env.replace(expr)
            return out
        if isinstance(size, int):
            return sympy.Integer(size)
        return size

    @property
    def seq_is_symbolic(self) -> bool:
        return bool(getattr(self.seq, "free_symbols", None))

    def has_seq(self, size: Any) -> bool:
        """Whether a dimension's size depends on the sequence length (a token axis)."""
        if isinstance(size, int):
            return False  # a plain int never involves T
        if not isinstance(size, torch.SymInt):  # a sympy expression
            return bool(self.seq_is_symbolic and self.seq.free_symbols & getattr(size, "free_symbols", set()))
        key = ("has_seq", size.node.expr)
        out = self._memo.get(key)
        if out is None:
            expr = self.canon(size)
            out = self._memo[key] = bool(
                self.seq_is_symbolic and self.seq.free_symbols & getattr(expr, "free_symbols", set())
            )
        return out

    def size_has_seq(self, value: Any) -> bool:
        """Whether a non-tensor value (a SymInt, or a tuple/torch.Size of sizes) involves T."""
        if isinstance(value, torch.SymInt):
            return self.has_seq(value)
        if isinstance(value, (tuple, list)):
            return any(self.size_has_seq(v) for v in value)
        return False

    def is_seq(self, size: Any) -> bool:
        return self.seq_is_symbolic and self.canon(size) == self.seq

    def is_batch(self, size: Any) -> bool:
        return self.canon(size) == self.batch

    def token_dims(self, value: Any) -> tuple[int, ...]:
        """Dims of a tensor value whose size involves the sequence length."""
        if not isinstance(value, torch.Tensor):
            return ()
        key = ("token_dims", id(value))
        hit = self._memo.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        dims = tuple(i for i, s in enumerate(value.shape) if self.has_seq(s))
        self._memo[key] = (value, dims)  # the value keeps its id alive and unique
        return dims


# Ops whose result is a view of their first argument: writing into it writes into that argument.
VIEW_OPS = frozenset(
    {
        "getitem",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "transpose",
        "permute",
        "movedim",
        "swapaxes",
        "t",
        "unsqueeze",
        "squeeze",
        "expand",
        "expand_as",
        "broadcast_to",
        "narrow",
        "select",
        "diagonal",
        "as_strided",
        "unfold",
        "split",
        "chunk",
        "tensor_split",
        "unbind",
        "view_as_real",
        "view_as_complex",
        "real",
        "imag",
        "detach",
        "contiguous",
        "T",
        "mT",
        "alias",
    }
)


def mutates(node: fx.Node) -> bool:
    """Whether `node` writes into its first argument (`x.clamp_(...)`, `x[idx] = v`, `x.copy_(y)`)."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = op_name(node)
    if name in _AUGMENTED:  # `buf[:, 1:] += x`: in place on a tensor
        return isinstance(node_value(node.args[0]), torch.Tensor)
    return name == "setitem" or (name.endswith("_") and not name.endswith("__") and name != "requires_grad_")


_AUGMENTED = frozenset(
    {
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "iand",
        "ior",
        "ixor",
        "ilshift",
        "irshift",
        "imatmul",
    }
)


_SHAPE_OF_SECOND = frozenset({"expand_as", "view_as", "reshape_as", "type_as", "broadcast_to"})
_SHAPE_ONLY = frozenset(
    {
        "zeros_like",
        "ones_like",
        "empty_like",
        "new_zeros",
        "new_ones",
        "new_empty",
        "size",
        "dim",
        "numel",
        "sym_size_int",
        "sym_numel",
    }
)


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    """The inputs whose values (not just shapes, dtypes or devices) flow into `n`."""
    name = op_name(n)
    if name in _SHAPE_ONLY:
        return []
    if name in _SHAPE_OF_SECOND:
        return [n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else []
    return n.all_input_nodes


class Ancestry:
    """Ancestor sets of every node of a graph as bitsets, for O(1) 'does a depend on b' queries.

    An in-place write is a new value of the tensor it writes into: every later read of that tensor,
    or of any view of it, depends on the write (and so on everything the write read). Without this,
    `buf = zeros_like(h); buf[:, 1:] = h[:, :-1]` would shift tokens with no op in the ancestry of
    `buf`'s readers."""

    def __init__(self, graph: fx.Graph, data_only: bool = False):
        """`data_only`: follow only the inputs whose values flow into the result (not the tensor
        `expand_as(x)` or `zeros_like(x)` reads the shape of)."""
        self.nodes: list[fx.Node] = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._anc: dict[fx.Node, int] = {}
        base: dict[fx.Node, fx.Node] = {}  # a view -> the tensor whose memory it is
        written: dict[fx.Node, int] = {}  # a base -> the ancestry of the writes into it so far
        for n in self.nodes:
            bits = 0
            for a in _data_inputs(n) if data_only else n.all_input_nodes:
                bits |= self._anc[a] | (1 << self.index[a])
                w = written.get(base.get(a, a))
                if w:
                    bits |= w
            self._anc[n] = bits
            if op_name(n) in VIEW_OPS and n.args and isinstance(n.args[0], fx.Node):
                base[n] = base.get(n.args[0], n.args[0])
            if mutates(n):
                target = cast(fx.Node, n.args[0])  # a mutating op's first argument is the tensor it writes
                root = base.get(target, target)
                written[root] = written.get(root, 0) | bits | (1 << self.index[n])

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """True when `b` depends (transitively) on `a`."""
        return bool((self._anc[b] >> self.index[a]) & 1)

    def ancestors(self, n: fx.Node) -> int:
        return self._anc[n]

    def members(self, bits: int) -> list[fx.Node]:
        out, i = [], 0
        while bits:
            if bits & 1:
                out.append(self.nodes[i])
            bits >>= 1
            i += 1
        return out

    def descendants_of_any(self, sources: Iterable[fx.Node]) -> int:
        """Bitset of nodes that depend on any of `sources` (sources excluded)."""
        mask = 0
        for s in sources:
            mask |= 1 << self.index[s]
        out = 0
        for n in self.nodes:
            if self._anc[n] & mask:
                out |= 1 << self.index[n]
        return out

    def bit(self, n: fx.Node) -> int:
        return 1 << self.index[n]
