"""One training run: its setup (setup.py), the loop (loop.py) and the callbacks around it
(callbacks.py, builtin_callbacks.py), evaluation and fit (train.py), checkpoints and resume
(checkpoint.py, resume.py), the run folder (runs.py), the history (history.py), the divergence watch
(divergence.py) and CUDA-graph replay (cuda_graph.py).

Deliberately empty: gpunet.training.checkpoint and .history are read by export, predict and generate
below the loop, and importing them must not import the loop.
"""
