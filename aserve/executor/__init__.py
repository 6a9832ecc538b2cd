"""The processes behind tensor parallelism, above the model side they run.

- worker_group.py (rank 0): starts the head node's worker processes, connects to them,
  sends each step (plan_channel.py: shm_ring.py on the node, a gloo broadcast to others),
  watches them and ends them;
- worker_proc.py (ranks 1..N-1): a worker's whole life, around a ModelRunner;
- headless.py: `python -m aserve --headless`, a node's ranks away from the head.
"""
