"""The stages of the suite: each takes loaded data or logits and typed parameters, computes, and
writes its files under the run's output folder (rank 0 only)."""
