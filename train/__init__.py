"""Toy sequence training for relattn: task generators, the Flax NNX trainer and its PyTorch twin.

Run ``python -m train --help``. The submodules import their framework lazily, so
``train.tasks`` / ``train.config`` need neither.
"""
