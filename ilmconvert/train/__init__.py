"""Fine-tuning converted networks: recipes, data, the training loop and evaluation."""
