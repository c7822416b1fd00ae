"""Graph passes: capture -> analyse -> rewrite -> compile.

backend.py   the torch.compile backend: finds the roles of the graph's inputs, runs the pass,
             records the report, hands the graph to the inner compiler
analyse.py   the residual stream, its branches, regions of accepted branches, the tail
ops.py       what each op does along the token axis (token-wise, attention, mixing)
masks.py     proof that an attention mask is "causal AND key is real" (SDPA fast path)
rewrite.py   gather -> replay on kept tokens -> scatter
kernels.py   the functions the rewritten graph calls (gathers, scatters, key masks, kept_rows)
graph.py     small helpers over FX graphs (values, symbolic token axes, ancestry)
"""
