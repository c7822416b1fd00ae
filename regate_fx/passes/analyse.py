"""Find the residual stream of a captured decoder and the branches that hang off it.

A decoder layer, whatever the family, is a residual stream `h` of shape (batch, tokens, hidden)
with branches added back onto it:

    pre-norm (Llama, Qwen, Mistral, Gemma, OPT, ...):  h = h + attn(norm(h)); h = h + mlp(norm(h))
    parallel (GPT-NeoX, GPT-J, Phi, Falcon):           h = h + (attn(norm(h)) + mlp(norm(h)))
    parallel, added one at a time (Cohere):            h = (h + attn(norm(h))) + mlp(norm(h))
    post-norm (OpenAI GPT, BERT as a decoder):         h = norm(h + attn(h)); h = norm(h + mlp(h))

The pass finds these adds from the graph alone: an add of two (B, T, D) tensors where one operand
(the carry) is an ancestor of the other (the branch), or, for the Cohere form, where the carry is
itself a stream add. Between two adds the stream may pass through token-wise ops (post-norm). Each
branch is then checked op by op (see ops.py); consecutive accepted branches form a region that the
rewrite runs on the kept tokens with the stream kept gathered throughout.

The guarantee is "exact or refused", so the analysis ends with one invariant over the whole graph
(`_check_coverage`): every node whose value carries the token axis is accounted for: on the stream,
inside a region replayed on kept tokens, in the tail, in our own kept-layout code, or proven
token-wise by ops.py. Anything else that mixes tokens (a convolution stem before the first add,
attention or an SSM scan the stream search did not reach, a reshape that moves tokens) is recorded
in `Analysis.outside` with the node, its module and the reason, and the backend refuses the graph.
Integer and boolean token-indexed values (attention masks, position ids, placeholder masks) get no
exemption: `Judge` gives every node a verdict along the token axis and the batch axis from the op
table, plus the few constructs it proves exact from the graph (the padding mask's cumsum as
position ids, an image-placeholder masked_scatter). In-place writes are new values (`Ancestry`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from regate_fx.passes.graph import (
    Ancestry,
    TokenSymbols,
    is_sdpa,
    module_path,
    mutates,
    node_value,
    op_name,
    param_path,
    sdpa_arg,
)
from regate_fx.passes.kernels import MARKERS
from regate_fx.passes.masks import is_causal_key_padding_mask
from regate_fx.passes.ops import (
    OK,
    Verdict,
    classify,
    higher_order_detail,
    length_scalar_problem,
    role_free,
    same_place,
)
from regate_fx.report import BranchKind, Reason

__all__ = ["Analysis", "Branch", "Outside", "Region", "Tail", "analyse", "find_tail"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}


@dataclass
class Branch:
    """One residual add `out = carry + branch(...)` of the stream."""

    index: int
    add: fx.Node
    carry: fx.Node
    output: fx.Node
    nodes: list[fx.Node]
    attention: list[tuple[fx.Node, str]] = field(default_factory=list)
    kind: BranchKind = BranchKind.OTHER
    ok: bool = True
    reason: Reason | None = None
    detail: str = ""
    layer: str = "?"
    module: str = "?"

    def refuse(self, reason: Reason, detail: str) -> None:
        if self.ok:
            self.ok, self.reason, self.detail = False, reason, detail

    @property
    def attention_form(self) -> str | None:
        forms = {f for _, f in self.attention}
        if not forms:
            return None
        if "sdpa" in forms:
            return "sdpa"
        return "cross" if "cross" in forms else "eager"  # cross: sdpa over another sequence's keys


@dataclass
class Region:
    """Consecutive accepted branches [first, last]; replayed on kept tokens as one piece."""

    first: int
    last: int
    start: fx.Node  # full-length stream value entering the region (gathered once)
    end: fx.Node  # the last stream add of the region
    nodes: list[fx.Node]  # every node replayed on kept tokens, in graph order
    side_inputs: list[fx.Node] = field(default_factory=list)


@dataclass
class Tail:
    """The ops after the stream that produce the model's output (final norm, LM head, logit
    soft-capping): replayed on the last region's kept rows instead of all T rows."""

    take: fx.Node  # the kept_rows(output, gather_idx) marker
    end: fx.Node  # the stream value the tail starts from (the last region's end)
    nodes: list[fx.Node]


@dataclass
class Outside:
    """A node outside every rewritten branch that mixes tokens: the graph cannot be exact."""

    node: fx.Node
    module: str
    reason: Reason
    detail: str


@dataclass
class Analysis:
    sym: TokenSymbols | None
    branches: list[Branch] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    tail: Tail | None = None
    tail_detail: str = ""
    """Why the tail runs at full length, when it does."""
    causal_masks: set[fx.Node] = field(default_factory=set)
    """SDPA masks proven "causal AND key is real" (masks.py): kept tokens use is_causal=True."""
    outside: list[Outside] = field(default_factory=list)
    """Token-mixing nodes that no branch, region or tail accounts for (see `_check_coverage`)."""
    reason: Reason | None = None
    detail: str = ""
    judge: "Judge | None" = None
    """Verdicts along the token and batch axes (see `Judge`)."""

    def verdict(self, n: fx.Node) -> Verdict:
        return self.judge.verdict(n) if self.judge is not None else classify(n, self.sym)


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "to", "view_as", "reshape_as"}
_VIEW_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_PLACEMENTS = {"getitem", "unsqueeze", "expand", "view", "reshape", "to", "long", "int"}


class Judge:
    """Every node's verdict along the token axis *and* the batch axis, from the op table (ops.py)
    plus the constructs that are exact only because of where their values come from.

    - The token axis: `ops.classify`, for floating-point and integer/boolean tensors alike (a hash
      of neighbouring ids or a position delta mixes tokens as much as a convolution does).
    - The batch axis: the oracle runs each sample alone, so an op that reads other samples
      (`h.mean(0)`, a batch norm, a reshape that moves samples, a number derived from B) has no
      per-sample result: `BATCH_MIXING`, in either layout.
    - Recognised constructs, proven from the graph: the cumsum of the padding mask along the
      tokens (position ids; kept positions keep their original ids), a masked_scatter whose mask
      is computed from the input ids alone (image placeholders, which the runtime protects), and
      document ids from position restarts compared only for equality (`_document_ids`).
    """

    def __init__(self, graph: fx.Graph, sym: TokenSymbols, anc: Ancestry, seq: fx.Node, padding: fx.Node | None):
        self.sym, self.anc = sym, anc
        b_syms = getattr(sym.batch, "free_symbols", set())
        self.sym_b = (
            TokenSymbols(sym.shape_env, sym.seq, sym.batch) if b_syms and not (b_syms & sym.seq.free_symbols) else None
        )
        tokened = [n for n in graph.nodes if isinstance(node_value(n), torch.Tensor) and sym.token_dims(node_value(n))]
        content = [n for n in tokened if node_value(n).is_floating_point() or node_value(n).is_complex()]
        # provenance follows values, not shapes: `image_mask.expand_as(embeds)` is still the ids' mask
        self.data = data = Ancestry(graph, data_only=True)
        self.content = data.descendants_of_any(content) | sum(data.bit(n) for n in content)
        sources = [
            n
            for n in tokened
            if n.op == "placeholder"
            or not any(
                isinstance(node_value(a), torch.Tensor) and sym.token_dims(node_value(a)) for a in n.all_input_nodes
            )
        ]
        self.seq, self.padding = seq, padding
        self.not_ids = sum(data.bit(n) for n in sources if n is not seq)  # positions, masks, arange(T), ...
        self.not_padding = sum(data.bit(n) for n in sources if n is not padding)
        self._memo: dict[fx.Node, Verdict] = {}
        self.documents = self._document_ids(graph)

    def _document_ids(self, graph: fx.Graph) -> set[fx.Node]:
        """Document ids from position restarts, compared only for equality (transformers'
        `find_packed_sequence_indices`: `(diff(position_ids, prepend=...) != 1).cumsum(-1)`, then
        `docs[b, q] == docs[b, kv]`). Computed at full length from the position ids alone, the ids
        are every token's true document; gathered, a kept pair compares equal exactly when its
        tokens share a document. The nodes of such a construct, or an empty set."""
        data = self.data
        forbidden = self.content | data.bit(self.seq) | (data.bit(self.padding) if self.padding is not None else 0)
        out: set[fx.Node] = set()
        for c in graph.nodes:
            if op_name(c) != "cumsum" or (data.ancestors(c) | data.bit(c)) & forbidden:
                continue
            placed, stack, ok = {c}, [c], True
            while stack and ok:  # every use: placements of c ending in an equality of two of them
                for u in stack.pop().users:
                    name = op_name(u)
                    if name in _PLACEMENTS and u.args[0] in placed:
                        if u not in placed:
                            placed.add(u)
                            stack.append(u)
                    elif name in ("eq", "ne") and len(u.args) == 2 and all(a in placed for a in u.args):
                        continue
                    else:
                        ok = False
                        break
            if not ok:
                continue
            members = set(placed)
            for n in reversed(self.anc.members(data.ancestors(c))):
                if (
                    n.op in ("call_function", "call_method")
                    and n.users
                    and all(u in members for u in n.users)
                    and not (data.ancestors(n) | data.bit(n)) & forbidden
                ):
                    members.add(n)
            out |= (members - placed) | {c}  # placements of the ids are judged as any getitem
        return out

    def _from_only(self, n: fx.Node, source: fx.Node | None, others: int) -> bool:
        if source is None or not isinstance(n, fx.Node):
            return False
        bits = self.data.ancestors(n) | self.data.bit(n)
        return bool(bits & self.data.bit(source)) and not bits & (others | self.content)

    def _construct(self, n: fx.Node) -> bool:
        name = op_name(n)
        if name in ("masked_scatter", "masked_scatter_"):
            src = node_value(n.args[2]) if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
            mask = n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")
            return not (isinstance(src, torch.Tensor) and self.sym.token_dims(src)) and self._from_only(
                mask, self.seq, self.not_ids
            )
        if name == "cumsum":  # position ids from the padding mask: cumsum(attention_mask) - 1
            return self._from_only(n.args[0] if n.args else None, self.padding, self.not_padding)
        return False

    def verdict(self, n: fx.Node) -> Verdict:
        v = self._memo.get(n)
        if v is None:
            v = self._memo[n] = self._verdict(n)
        return v

    def _verdict(self, n: fx.Node) -> Verdict:
        if n in self.documents:
            return OK
        v = classify(n, self.sym)
        if not v.ok and v.reason is Reason.TOKEN_MIXING and self._construct(n):
            v = OK
        elif not v.ok and op_name(n) in ("masked_scatter", "masked_scatter_"):
            mask = n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")
            if isinstance(mask, fx.Node) and not (self.data.ancestors(mask) | self.data.bit(mask)) & self.content:
                return Verdict(
                    False,
                    reason=Reason.BATCH_MIXING,
                    detail=(
                        "masked_scatter numbers the positions its mask selects across the whole batch, with a mask "
                        "that is not computed from the input ids alone"
                    ),
                )
        if not v.ok or v.attention is not None or self.sym_b is None or n.op not in ("call_function", "call_method"):
            return v
        if op_name(n) in _VIEW_RESHAPES:
            x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if x is not None and same_place(node_value(x), node_value(n), self.sym, "batch"):
                return v
            vb = Verdict(False, reason=Reason.TOKEN_MIXING, detail=f"{op_name(n)} moves samples")
        elif self._construct(n):
            return v
        elif role_free(n):  # same rule on either axis; only a number derived from B differs
            vb = length_scalar_problem(n, self.sym_b)
            if vb is None:
                return v
        else:
            vb = classify(n, self.sym_b)
            if vb.token_wise:
                return v
        return Verdict(
            False,
            reason=Reason.BATCH_MIXING,
            detail=f"{vb.detail or 'attention'} along the batch axis: it couples samples (the oracle, "
            "and any per-sample result, runs each sample alone)",
        )


# A stream value: floating point (B, T, D), or (B*T, D) when a layer flattens the tokens (OPT).
def _is_stream_value(v, sym: TokenSymbols, flat_ok: bool = True) -> bool:
    if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() in (2, 3)):
        return False
    if sym.has_seq(v.shape[-1]):
        return False
    if v.dim() == 3:
        return sym.is_seq(v.shape[1]) and sym.is_batch(v.shape[0])
    return flat_ok and sym.canon(v.shape[0]) == sym.batch * sym.seq


def _is_reshape(n: fx.Node) -> bool:
    return (
        n.op in ("call_method", "call_function")
        and op_name(n) in _RESHAPES
        and len([a for a in n.all_input_nodes if isinstance(node_value(a), torch.Tensor)]) == 1
    )


# Walks back through reshapes/casts to the value they re-view (OPT flattens the stream).
def stream_root(n: fx.Node) -> fx.Node:
    while _is_reshape(n) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _is_candidate_add(n: fx.Node, sym: TokenSymbols) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCTIONS:
        pass
    elif n.op == "call_method" and n.target in _ADD_METHODS:
        pass
    else:
        return False
    if len(n.args) < 2 or "alpha" in n.kwargs:
        return False
    a, b = n.args[0], n.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    va, vb, vo = node_value(a), node_value(b), node_value(n)
    if not all(_is_stream_value(v, sym) for v in (va, vb, vo)):
        return False
    return va.dim() == vb.dim() and all(sym.canon(x) == sym.canon(y) for x, y in zip(va.shape, vb.shape))


def find_stream(graph: fx.Graph, sym: TokenSymbols, anc: Ancestry) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Return the longest chain of stream adds as (add, carry, branch_output) triples."""
    adds: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for n in graph.nodes:
        if not _is_candidate_add(n, sym):
            continue
        a, b = n.args[0], n.args[1]
        if anc.is_ancestor(a, b):
            adds[n] = (a, b)
        elif anc.is_ancestor(b, a):
            adds[n] = (b, a)
        elif (stream_root(a) in adds) != (stream_root(b) in adds):  # Cohere: (h + attn) + mlp
            adds[n] = (a, b) if stream_root(a) in adds else (b, a)
    # Link adds whose carry is (a token-wise function of) the previous add into chains; keep the longest.
    next_of: dict[fx.Node, fx.Node | None] = {}
    prev_of = {n: _previous_add(carry, adds, sym, anc) for n, (carry, _) in adds.items()}
    for n, root in prev_of.items():
        if root is not None:
            next_of[root] = None if root in next_of else n  # two continuations: ambiguous, cut
    heads = [n for n, root in prev_of.items() if root is None]
    best: list[fx.Node] = []
    for h in heads:
        chain, cur = [h], h
        while next_of.get(cur) is not None:
            cur = next_of[cur]
            chain.append(cur)
        if len(chain) > len(best):
            best = chain
    return [(n, adds[n][0], adds[n][1]) for n in best]


_PROJECTIONS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "embedding"}


def _previous_add(carry: fx.Node, adds: dict, sym: TokenSymbols, anc: Ancestry) -> fx.Node | None:
    """The stream add that `carry` continues: itself re-viewed, or passed through token-wise ops
    whose only token-indexed input is that add (a post-norm: h = norm(h + attn(h)))."""
    root = stream_root(carry)
    if root in adds:
        return root
    before = [a for a in adds if a is not carry and anc.is_ancestor(a, carry)]
    if not before:
        return None
    prev = before[-1]  # adds are in graph order
    pv, cv = node_value(prev), node_value(carry)
    if pv.dim() != cv.dim() or any(sym.canon(a) != sym.canon(b) for a, b in zip(pv.shape, cv.shape)):
        return None  # a projection to another width (an MLP's hidden), not the stream
    between = anc.members(anc.descendants_of_any([prev]) & (anc.ancestors(carry) | anc.bit(carry)))
    inside = set(between) | {prev}
    for n in between:
        if op_name(n) in _PROJECTIONS or not classify(n, sym).token_wise:
            return None
        if any(a not in inside and sym.token_dims(node_value(a)) for a in n.all_input_nodes):
            return None  # another token-indexed source joins: not a function of the stream alone
    return prev


def stream_3d(n: fx.Node, sym: TokenSymbols) -> fx.Node | None:
    """`n` itself if (B, T, D), else the re-view of it to (B, T, D) that the graph makes next."""
    while not _is_stream_value(node_value(n), sym, flat_ok=False):
        nxt = [u for u in n.users if _is_reshape(u)]
        if len(nxt) != 1:
            return None
        n = nxt[0]
    return n


def _label(nodes: list[fx.Node]) -> tuple[str, str]:
    """(layer, module) paths from the parameters the branch's projections use; display only."""
    projections = [n for n in nodes if op_name(n) in ("linear", "matmul", "conv1d", "addmm")]
    paths = [module_path(n).split(".") for n in projections or nodes if module_path(n)]
    for n in (projections or nodes) if not paths else ():  # no nn_module_stack: parameter names
        for a in n.all_input_nodes:
            if a.op == "placeholder":
                p = param_path(a.name)
                if p:
                    paths.append(p.split(".")[:-1])
    if not paths:
        return "?", "?"
    prefix = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(prefix), len(p)) and prefix[i] == p[i]:
            i += 1
        prefix = prefix[:i]
    module = ".".join(prefix) or "?"
    layer = module
    for i, part in enumerate(prefix):
        if part.isdigit():
            layer = ".".join(prefix[: i + 1])
            break
    return layer, module


def _kind(branch: Branch, anc: Ancestry) -> BranchKind:
    linears = [
        n
        for n in branch.nodes
        if op_name(n) in ("linear", "matmul", "addmm", "mm", "bmm") and n not in {a for a, _ in branch.attention}
    ]
    if not branch.attention:
        return BranchKind.MLP if linears else BranchKind.OTHER
    att = [a for a, f in branch.attention if f in ("sdpa", "pv")]  # the attention read-out
    if not att:
        return BranchKind.ATTENTION
    # A linear unrelated to the attention op (neither feeding it nor fed by it) is a parallel MLP.
    for lin in linears:
        if all(not anc.is_ancestor(lin, a) and not anc.is_ancestor(a, lin) for a in att):
            return BranchKind.PARALLEL
    return BranchKind.ATTENTION


def analyse(
    gm: fx.GraphModule, seq_input: fx.Node, padding: fx.Node | None = None, layout: list[fx.Node] | None = None
) -> Analysis:
    """Analyse a dynamo graph: the stream, its branches, which branches can run on kept tokens.

    Args:
        gm: the graph dynamo captured (torch-level, before autograd).
        seq_input: the placeholder of the (batch, tokens) or (batch, tokens, hidden) model input
            that defines the token axis (input ids or input embeddings).
        padding: the placeholder of the model's (batch, tokens) attention_mask input, if any.
    """
    sym = TokenSymbols.from_value(node_value(seq_input))
    if sym is None or not sym.seq_is_symbolic:
        t = node_value(seq_input).shape[1] if isinstance(node_value(seq_input), torch.Tensor) else "?"
        why = (
            "sequences of length 0/1 are always specialised by dynamo: use at least 2 tokens"
            if isinstance(t, int) and t < 2
            else "an input whose token axis was not marked dynamic, or an op that needs a fixed length, "
            "fixed it (inputs passed through sparsify() are marked: see regate_fx/capture.py)"
        )
        return Analysis(
            sym,
            reason=Reason.SEQ_SPECIALIZED,
            detail=f"the sequence length was specialised to {t} while tracing; {why}",
        )
    graph = gm.graph
    anc = Ancestry(graph)
    chain = find_stream(graph, sym, anc)
    hops = [n for n in graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]
    if not chain and hops:  # e.g. every layer inside an activation-checkpoint region
        return Analysis(sym, reason=Reason.HIGHER_ORDER_OP, detail=higher_order_detail(hops[0]))
    if not chain:
        return Analysis(
            sym,
            reason=Reason.NO_STREAM,
            detail="no residual add over (batch, tokens, hidden) tensors was found; is this a transformer decoder?",
        )
    stream_nodes = [stream_root(chain[0][1])]
    for k, (add, carry, _) in enumerate(chain):
        if k:  # re-views and token-wise links (post-norm) between the previous add and this carry
            prev = chain[k - 1][0]
            bits = anc.descendants_of_any([prev]) & (anc.ancestors(carry) | anc.bit(carry))
            stream_nodes.extend(anc.members(bits))
        stream_nodes.append(add)
    stream_set = set(stream_nodes)
    stream_dep = anc.descendants_of_any([stream_nodes[0]])

    judge = Judge(graph, sym, anc, seq_input, padding)
    branches: list[Branch] = []
    for i, (add, carry, out) in enumerate(chain):
        bits = (anc.ancestors(out) | anc.bit(out)) & stream_dep & ~anc.ancestors(carry) & ~anc.bit(carry)
        nodes = _with_inplace([n for n in anc.members(bits) if n not in stream_set], anc)
        br = Branch(i, add, carry, out, nodes)
        for n in nodes:
            v = judge.verdict(n)
            if v.attention:
                br.attention.append((n, v.attention))
            if not v.ok:
                br.refuse(v.reason, f"{v.detail} (node '{n.name}')")
        br.layer, br.module = _label(nodes)
        br.kind = _kind(br, anc)
        branches.append(br)

    analysis = Analysis(sym, branches, judge=judge)
    # Regions, refining until no region has a problem that only shows at region level.
    for _ in range(2 * len(branches) + 2):
        before = sum(b.ok for b in branches)
        analysis.regions = _regions(branches, anc, sym)
        _check_regions(analysis, anc, sym, stream_set)
        if sum(b.ok for b in branches) == before:
            break
    analysis.tail, analysis.tail_detail = find_tail(graph, analysis, anc)
    for region in analysis.regions:
        for n in region.nodes:
            mask = sdpa_arg(n, "attn_mask") if is_sdpa(n) else None
            if mask is not None and is_causal_key_padding_mask(mask, sym, padding):
                analysis.causal_masks.add(mask)
    # The value entering the stream is computed at full length like any other: checked, not exempt.
    analysis.outside = _check_coverage(graph, analysis, anc, stream_set - {stream_nodes[0]}, layout or [], seq_input)
    return analysis


def _check_coverage(
    graph: fx.Graph, analysis: Analysis, anc: Ancestry, stream: set[fx.Node], layout: list[fx.Node], seq: fx.Node
) -> list[Outside]:
    """The invariant: every token-indexed node is on the stream, replayed on kept tokens, in the
    tail, in our kept-layout code, refused already, or token-wise (along the batch axis too).
    Returns the nodes that are not.

    Integer and boolean values (masks, position ids, hashes of ids) get no exemption: they are
    judged by the same op table as the hidden states, plus the constructs `Judge` proves exact."""
    covered = set(stream)
    for region in analysis.regions:
        covered.update(region.nodes)
    if analysis.tail is not None:
        covered.update(analysis.tail.nodes)
    for b in analysis.branches:
        if not b.ok:
            covered.update(b.nodes)  # already refused with its own reason
    ours = anc.descendants_of_any(layout) if layout else 0  # kept_rows, the loss on kept rows
    ours |= _feeds_only_ours(graph, anc, ours)
    # Values no output depends on (LLaVA's placeholder count, read only by a size check) cannot
    # change a result; in-place writes stay checked (they are new values of what they write into).
    live = 0
    for n in graph.nodes:
        if n.op == "output":
            live |= anc.ancestors(n)
    out = []
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method") or n in covered or (ours >> anc.index[n]) & 1:
            continue
        if not (live >> anc.index[n]) & 1 and not mutates(n):
            continue
        v = analysis.verdict(n)
        if v.token_wise:
            continue
        if v.ok:  # attention the stream search did not reach runs on every token
            reason, detail = Reason.TOKEN_MIXING, "attention outside the rewritten branches runs on all tokens"
        else:
            reason, detail = v.reason, v.detail
        out.append(Outside(n, module_path(n) or "<model>", reason, f"{detail} (node '{n.name}')"))
    return out


def _feeds_only_ours(graph: fx.Graph, anc: Ancestry, ours: int) -> int:
    """Nodes used only by the step's own kept-layout code and not by the model's output: the step's
    `labels[:, 1:]` shift (the prediction at p is scored on the label of p + 1 by definition). The
    model reaches the step only through its logits, whose ancestors are never exempt."""
    takes = [n for n in graph.nodes if n.op == "call_function" and n.target in MARKERS]
    model = 0
    for t in takes:
        x = t.args[0]
        if isinstance(x, fx.Node):
            model |= anc.ancestors(x) | anc.bit(x)
    out = 0
    for n in reversed(anc.nodes):
        bit = anc.bit(n)
        if n.op not in ("call_function", "call_method") or not n.users or model & bit:
            continue
        if all((ours | out) & anc.bit(u) for u in n.users):
            out |= bit
    return out


def _regions(branches: list[Branch], anc: Ancestry, sym: TokenSymbols) -> list[Region]:
    out: list[Region] = []
    i = 0
    while i < len(branches):
        if not branches[i].ok:
            i += 1
            continue
        j = i
        while j + 1 < len(branches) and branches[j + 1].ok:
            j += 1
        start, end = stream_root(branches[i].carry), stream_3d(branches[j].add, sym)
        if end is None or not _is_stream_value(node_value(start), sym, flat_ok=False):
            branches[j if end is None else i].refuse(
                Reason.ESCAPING_VALUE, "the stream is not re-viewed as (batch, tokens, hidden) here"
            )
            i = j + 1
            continue
        bits = anc.descendants_of_any([start]) & (anc.ancestors(end) | anc.bit(end))
        out.append(Region(i, j, start, end, _with_inplace(anc.members(bits), anc)))
        i = j + 1
    return out


def _mutates(u: fx.Node, n: fx.Node) -> bool:
    """Whether `u` is an in-place op on `n` (`n.clamp_(...)`, `n[idx] = v`)."""
    return bool(u.args) and u.args[0] is n and mutates(u)


def _with_inplace(nodes: list[fx.Node], anc: Ancestry) -> list[fx.Node]:
    """`nodes` plus the in-place ops that mutate one of them (OLMo's `query_states.clamp_(...)`).

    Such an op's result is unused, so it is no one's ancestor; without it a replay on kept tokens
    would drop the mutation, and it would look like a use escaping the branch."""
    members = set(nodes)
    extra = [u for n in nodes for u in n.users if u not in members and _mutates(u, n)]
    if not extra:
        return nodes
    return sorted(members | set(extra), key=lambda n: anc.index[n])


def _owner(n: fx.Node, region: Region, branches: list[Branch]) -> Branch:
    for b in branches[region.first : region.last + 1]:
        if n in b.nodes or n is b.add:
            return b
    return branches[region.first]


def _check_regions(analysis: Analysis, anc: Ancestry, sym: TokenSymbols, stream: set[fx.Node]) -> None:
    """Refuse branches whose problems show only at region level (escapes, side inputs, sizes)."""
    branches = analysis.branches
    for region in analysis.regions:
        members = set(region.nodes)
        checked = {n for b in branches[region.first : region.last + 1] for n in b.nodes}
        side: dict[fx.Node, None] = {}
        for n in region.nodes:
            if n not in checked and n not in stream:
                v = analysis.verdict(n)  # a node shared with a branch outside the region
                if not v.ok:
                    _owner(n, region, branches).refuse(v.reason, f"{v.detail} (node '{n.name}')")
            # Intermediates may not escape; (B, T, D) stream values may (they are scattered back).
            if n is not region.end and not (n in stream and _is_stream_value(node_value(n), sym, flat_ok=False)):
                for u in n.users:
                    if u not in members:
                        _owner(n, region, branches).refuse(
                            Reason.ESCAPING_VALUE,
                            f"'{n.name}' is also used by '{u.name}' outside the decoder stream "
                            "(e.g. returned attention weights); pass output_attentions=False",
                        )
                        break
            for a in n.all_input_nodes:
                if a not in members:
                    side[a] = None
        for a in side:
            problem = _side_input_problem(a, sym)
            mutated = next((u for u in a.users if _mutates(u, a)), None)
            if problem is None and mutated is not None and sym.token_dims(node_value(a)):
                # it is gathered where it is computed: a later in-place change would be missed
                problem = (
                    Reason.UNSUPPORTED_OP,
                    f"side input '{a.name}' is modified in place by '{mutated.name}' after it is computed",
                )
            if problem is not None:
                user = next(u for u in a.users if u in members)
                _owner(user, region, branches).refuse(*problem)
        region.side_inputs = list(side)


def _side_input_problem(a: fx.Node, sym: TokenSymbols) -> tuple[Reason, str] | None:
    """Why a value computed outside a replayed piece cannot be brought to kept tokens, if it can't."""
    v = node_value(a)
    if isinstance(v, torch.Tensor):
        toks = sym.token_dims(v)
        if toks and (0 in toks or not (sym.is_batch(v.shape[0]) or sym.canon(v.shape[0]) == 1)):
            return (
                Reason.NO_BATCH_AXIS,
                f"side input '{a.name}' {tuple(v.shape)} has a token axis but no leading batch axis",
            )
    elif sym.size_has_seq(v) and not _sym_derivable(a, sym):
        return Reason.SYMBOLIC_SIZE, f"size '{a.name}' = {v} cannot be re-derived for kept tokens"
    return None


def find_tail(graph: fx.Graph, analysis: Analysis, anc: Ancestry) -> tuple[Tail | None, str]:
    """The ops between the end of the stream and the `kept_rows` marker (final norm, LM head).

    They can run on kept rows only when the last region ends the stream, every op is token-wise,
    and nothing in between is used elsewhere. Returns (tail, "") or (None, why not).
    """
    sym = analysis.sym
    takes = [n for n in graph.nodes if n.op == "call_function" and n.target in MARKERS]
    if len(takes) != 1:
        return None, "the model's output is not read at kept rows once (no kept_rows marker)"
    take = takes[0]
    if not analysis.regions or analysis.regions[-1].last != len(analysis.branches) - 1:
        return None, "the last branch of the stream runs dense"
    end = analysis.regions[-1].end
    x = take.args[0]
    nodes = anc.members(anc.descendants_of_any([end]) & (anc.ancestors(x) | anc.bit(x)))
    if not nodes:
        return None, "the output does not depend on the end of the stream"
    members = set(nodes)
    for n in nodes:
        v = analysis.verdict(n)
        if not v.ok or v.attention:
            return None, f"'{n.name}' is not token-wise ({v.detail or 'attention'})"
        for u in n.users:
            if u not in members and u is not take:
                return None, f"'{n.name}' is also used by '{u.name}'"
        for a in n.all_input_nodes:
            problem = None if a in members or a is end else _side_input_problem(a, sym)
            if problem is not None:
                return None, problem[1]
    return Tail(take, end, nodes), ""


# Size arithmetic the rewrite can replay with K in place of T: `T * H`, `torch.Size([B, T, D])`
# (GPT-2's Conv1D builds its output shape that way), `x.size()[:-1] + (D,)`.
_SYM_OPS = {
    operator.mul,
    operator.add,
    operator.sub,
    operator.floordiv,
    operator.neg,
    operator.mod,
    operator.getitem,
    torch.Size,
}


def _sym_derivable(a: fx.Node, sym: TokenSymbols) -> bool:
    """Whether a size (or tuple of sizes) that involves the sequence length can be rebuilt with K."""
    v = node_value(a)
    if isinstance(v, torch.Tensor) or not sym.size_has_seq(v) or sym.is_seq(v):
        return True  # tensors are gathered; sizes without T are kept as they are
    if (a.op == "call_function" and a.target in _SYM_OPS) or (a.op == "call_method" and a.target == "size"):
        return all(_sym_derivable(x, sym) for x in a.all_input_nodes)
    return False
