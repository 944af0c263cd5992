"""Training objectives (negative ELBO, GAN losses)."""
