"""Graph passes: capture -> analyse -> rewrite -> compile.

backend.py     the torch.compile backend: finds the roles of the graph's inputs, runs the pass,
               records the report, hands the graph to the inner compiler
checkpoint.py  activation-checkpoint regions inlined into the graph, tagged for recompute
analyse.py     the residual stream's branches, regions of accepted branches, the tail, coverage
stream.py      the residual stream: the chain of adds `h = h + branch(h)`
judge.py       every node's verdict along the token axis and the batch axis
dispatch.py    a token-choice MoE dispatch that sorts rows by expert, proven per token
tiling.py      an expert-major tiled MoE (Llama 4: rows repeated once per expert), proven per token
ops.py         the op table: what each op does along the token axis (token-wise, attention, mixing);
               its rules in rules.py, the aten overload a call binds in overloads.py, where the
               token and batch axes lie in memory in placement.py
masks.py       proof that an attention mask is "causal AND key is real" (SDPA fast path)
sizes.py       which sizes and side inputs a replayed piece can take from outside
packed.py      when a graph may run on the packed layout
rewrite.py     gather -> replay on kept tokens -> scatter, asking the layout
kernels.py     the functions the rewritten graph calls (gathers, scatters, key masks, kept_rows)
graph.py       small helpers over FX graphs (values, symbolic token axes, ancestry)
"""
