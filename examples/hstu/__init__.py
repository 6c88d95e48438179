"""HSTU (generative recommender) training example: data loading, model and training loop."""
