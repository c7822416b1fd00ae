"""Find the residual stream of a captured decoder and the branches that hang off it.

A decoder layer, whatever the family, is a residual stream `h` of shape (batch, tokens, hidden)
with branches added back onto it:

    pre-norm (Llama, Qwen, Mistral, Gemma, OPT, ...):  h = h + attn(norm(h)); h = h + mlp(norm(h))
    parallel (GPT-NeoX, GPT-J, Phi, Falcon):           h = h + (attn(norm(h)) + mlp(norm(h)))
    parallel, added one at a time (Cohere):            h = (h + attn(norm(h))) + mlp(norm(h))
    post-norm (OpenAI GPT, BERT as a decoder):         h = norm(h + attn(h)); h = norm(h + mlp(h))

The pass finds these adds from the graph alone (stream.py): an add of two (B, T, D) tensors where
one operand (the carry) is an ancestor of the other (the branch), or, for the Cohere form, where the
carry is itself a stream add. Between two adds the stream may pass through token-wise ops
(post-norm). Each branch is then checked op by op (`Judge`, judge.py, over the op table of ops.py);
consecutive accepted branches form a region that the
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

About 450 lines: the analysis's records (`Branch`, `Region`, `Tail`, `Analysis`) and the steps
that fill them in order (branches, regions, tail, coverage) read as one pass; the parts that stand
alone are in stream.py, judge.py and sizes.py.
"""

from __future__ import annotations

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
from regate_fx.passes.judge import Judge
from regate_fx.passes.kernels import MARKERS
from regate_fx.passes.masks import is_causal_key_padding_mask
from regate_fx.passes.ops import Verdict, classify, higher_order_detail
from regate_fx.passes.reductions import Reductions, find_reductions
from regate_fx.passes.sizes import side_input_problem
from regate_fx.passes.stream import find_stream, is_stream_value, stream_3d, stream_start, written_in_place
from regate_fx.report import BranchKind, Reason

__all__ = ["Analysis", "Branch", "Judge", "Outside", "Region", "Tail", "analyse", "find_tail"]


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
    reductions: Reductions | None = None
    """Region values reduced over the batch outside the decoder (a router's aux loss: reductions.py)."""

    def verdict(self, n: fx.Node) -> Verdict:
        if self.judge is not None:
            return self.judge.verdict(n)
        assert self.sym is not None  # only an analysis that found the token axis judges nodes
        return classify(n, self.sym)


def _label(nodes: list[fx.Node]) -> tuple[str, str]:
    """(layer, module) paths from the parameters the branch's projections use; display only."""
    projections = [n for n in nodes if op_name(n) in ("linear", "matmul", "conv1d", "addmm")]
    paths = [module_path(n).split(".") for n in projections or nodes if module_path(n)]
    for n in (projections or nodes) if not paths else ():  # no nn_module_stack: parameter names
        for a in n.all_input_nodes:
            if a.op == "placeholder":
                path = param_path(a.name)
                if path:
                    paths.append(path.split(".")[:-1])
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
    stream_nodes = [stream_start(chain[0][1], chain[0][2], sym, anc)]
    for k, (add, carry, _) in enumerate(chain):
        # re-views and token-wise links (post-norm, a scaled carry) between the previous add and this carry
        prev = chain[k - 1][0] if k else stream_nodes[0]
        bits = anc.descendants_of_any([prev]) & (anc.ancestors(carry) | anc.bit(carry))
        stream_nodes.extend(anc.members(bits))
        stream_nodes.append(add)
    # after the last add, the stream goes on through in-place writes into it (Gemma 4's
    # `hidden_states *= self.layer_scalar`): that is the value the final norm reads
    last = stream_3d(chain[-1][0], sym)
    if last is not None:
        stream_nodes.extend(written_in_place(last, sym))
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
                assert v.reason is not None  # every refusing verdict names its reason
                br.refuse(v.reason, f"{v.detail} (node '{n.name}')")
        br.layer, br.module = _label(nodes)
        br.kind = _kind(br, anc)
        branches.append(br)

    analysis = Analysis(sym, branches, judge=judge)
    # Regions, refining until no region has a problem that only shows at region level.
    problem = None
    for _ in range(2 * len(branches) + 2):
        before = sum(b.ok for b in branches)
        analysis.regions = _regions(branches, anc, sym, judge.dispatch)
        members = {n for r in analysis.regions for n in r.nodes}
        analysis.reductions, found = find_reductions(graph, members, stream_set, judge.verdict, sym, padding)
        problem = problem or found  # the first: once refused, its branches leave the regions
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
    if problem is not None:  # the aux loss first: the escapes and outside nodes it causes follow from it
        analysis.outside.insert(
            0,
            Outside(
                problem.node,
                module_path(problem.node) or "<model>",
                problem.reason,
                f"router auxiliary loss: {problem.detail}",
            ),
        )
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
    red = analysis.reductions
    if red is not None:  # replayed on the kept layout; a node also read elsewhere stays and is judged
        covered.update(n for n in red.nodes if all(u in red or u.op == "output" for u in n.users))
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
            assert v.reason is not None  # every refusing verdict names its reason
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


def _regions(branches: list[Branch], anc: Ancestry, sym: TokenSymbols, dispatch: set[fx.Node]) -> list[Region]:
    out: list[Region] = []
    i = 0
    while i < len(branches):
        if not branches[i].ok:
            i += 1
            continue
        j = i
        while j + 1 < len(branches) and branches[j + 1].ok:
            j += 1
        start = stream_start(branches[i].carry, branches[i].output, sym, anc)
        end = stream_3d(branches[j].add, sym)
        if end is not None:  # the region ends after the in-place writes into its last add (stream.py)
            end = ([end] + written_in_place(end, sym))[-1]
        if end is None or not is_stream_value(node_value(start), sym, flat_ok=False):
            branches[j if end is None else i].refuse(
                Reason.ESCAPING_VALUE, "the stream is not re-viewed as (batch, tokens, hidden) here"
            )
            i = j + 1
            continue
        bits = anc.descendants_of_any([start]) & (anc.ancestors(end) | anc.bit(end))
        nodes = anc.members(bits)
        # a proven expert dispatch's `arange(S)` (its inverse permutation) is built from sizes
        # alone: replayed with the kept rows' S, not read at full length (dispatch.py)
        members = set(nodes)
        sized = {a for n in nodes if n in dispatch for a in n.all_input_nodes if a in dispatch and a not in members}
        if sized:
            nodes = sorted(members | sized, key=lambda n: anc.index[n])
        out.append(Region(i, j, start, end, _with_inplace(nodes, anc)))
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


def _escape_detail(n: fx.Node, user: fx.Node, sym: TokenSymbols) -> str:
    """What an intermediate escaping its region is, for the refusal: a write into a buffer made
    outside the region, attention weights (queries x keys), a value the graph returns, or another use."""
    where = f" ({module_path(user)})" if module_path(user) else ""
    v = node_value(n)
    if isinstance(v, torch.Tensor) and v.dim() >= 3 and sym.token_dims(v)[-2:] == (v.dim() - 2, v.dim() - 1):
        return (
            f"attention weights '{n.name}' (queries x keys) are also used by '{user.name}'{where} outside the "
            "decoder stream (returned attention weights?): pass output_attentions=False"
        )
    if mutates(user) and user.args and user.args[0] is not n:
        buf = user.args[0]
        return (
            f"'{n.name}' is written in place by '{user.name}'{where} into '{getattr(buf, 'name', buf)}', a buffer "
            "created outside the rewritten branches (e.g. new_empty / zeros filled slice by slice): build the "
            "value from the branch's own tensors (torch.cat) or keep the branch dense (strict=False)"
        )
    if user.op == "output":
        return (
            f"'{n.name}' is returned by the graph (attention weights, router logits, an auxiliary output): "
            "turn that output off (output_attentions=False, output_router_logits=False) or keep the branch dense"
        )
    return (
        f"'{n.name}' is also used by '{user.name}' ({op_name(user)}){where} outside the decoder stream: that use "
        "would read kept tokens only"
    )


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
                    assert v.reason is not None  # every refusing verdict names its reason
                    _owner(n, region, branches).refuse(v.reason, f"{v.detail} (node '{n.name}')")
            # Intermediates may not escape; (B, T, D) stream values may (they are scattered back).
            if n is not region.end and not (n in stream and is_stream_value(node_value(n), sym, flat_ok=False)):
                for u in n.users:
                    if u not in members and (analysis.reductions is None or u not in analysis.reductions):
                        _owner(n, region, branches).refuse(Reason.ESCAPING_VALUE, _escape_detail(n, u, sym))
                        break
            for a in n.all_input_nodes:
                if a not in members:
                    side[a] = None
        for a in side:
            problem = side_input_problem(a, sym)
            # the start is gathered where it is computed and its in-place writes are region
            # members, replayed on the gathered stream (and judged like any member)
            mutated = next((u for u in a.users if _mutates(u, a) and not (a is region.start and u in members)), None)
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
    assert sym is not None  # an analysis with a stream found the token axis
    for n in nodes:
        v = analysis.verdict(n)
        if not v.ok or v.attention:
            return None, f"'{n.name}' is not token-wise ({v.detail or 'attention'})"
        for u in n.users:
            if u not in members and u is not take:
                return None, f"'{n.name}' is also used by '{u.name}'"
        for a in n.all_input_nodes:
            problem = None if a in members or a is end else side_input_problem(a, sym)
            if problem is not None:
                return None, problem[1]
    return Tail(take, end, nodes), ""
