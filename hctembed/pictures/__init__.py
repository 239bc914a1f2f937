"""Pictures drawn from numpy arrays with matplotlib's Agg canvas (no pyplot state, no torch): slices, attention
overlays, search montages and pages, the embedding map, and the benchmark plots."""
