"""Evidence beyond classification heads: segmentation, detection, diffusion and a language model."""
