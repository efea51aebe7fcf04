"""Generation: the continuous-batching scheduler, sampling and beam search, several devices, and the
memory checks that run before any work."""
