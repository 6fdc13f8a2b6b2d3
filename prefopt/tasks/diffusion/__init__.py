"""Diffusion domain: Diffusion-DPO for diffusers image models.

* :mod:`~prefopt.tasks.diffusion.digits`: the embedded default (scikit-learn digits, a small
  class-conditional DDPM trained once and cached, teacher-labelled pairs, image rewards);
* :mod:`~prefopt.tasks.diffusion.text_to_image`: a local diffusers pipeline on a Pick-a-Pic style table;
* :mod:`~prefopt.tasks.diffusion.data`: loading preference images and pipelines;
* :mod:`~prefopt.tasks.diffusion.rewards`: image rewards that need no download.

The adapter is :class:`prefopt.adapters.diffusion.DiffusionPolicy`.
"""
