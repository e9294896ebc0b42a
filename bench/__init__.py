"""`cake bench`: TTFT of compute-only, load-only, Cake and the oracle split, end to end."""
