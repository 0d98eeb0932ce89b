"""Router fine-tuning: recipes, data, the masked-diffusion objective, the training loop, checkpoints."""
