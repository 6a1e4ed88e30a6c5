"""Baselines the diffusion model is compared against: a non-learned physical false colouring
of the AF upsampled bicubically (`false_colour`), and a conditional GAN (`cgan`)."""
