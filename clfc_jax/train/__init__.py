"""Every jitted step and every training loop: the segmenter (steps, trainer), the IntroVAE
(introvae_steps, introvae_trainer) and what both loops share (loop)."""
